"""A full disk: every event still reaches the caller, no torn line is left, and errors name file and folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_core import files
from lora_core.eventlog import EventLog, read_events
from lora_core.events import Complete, Error, Progress
from lora_core.files import DiskFullError, atomic_write, atomic_write_text


class SmallDisk:
    """A folder on a 2 MiB tmpfs (we are root in the test environment). Where mounting is not allowed, the
    same folder on the normal disk, where `fill()` makes writes below it fail as on a full disk (os.write
    writes what is left, then raises ENOSPC; safetensors raises its own full-disk error)."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch):
        self.folder, self._monkeypatch = folder, monkeypatch
        folder.mkdir()
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                                      capture_output=True).returncode == 0

    def fill(self, leave: int = 0) -> None:
        """Take all the space but about `leave` bytes (whole tmpfs pages)."""
        if not self.mounted:
            self._fake_full(leave)
            return
        with open(self.folder / "filler", "wb", buffering=0) as out:
            try:
                while out.write(b"\0" * 65536):
                    pass
            except OSError:
                pass
        if leave:
            size = (self.folder / "filler").stat().st_size
            os.truncate(self.folder / "filler", max(0, size - leave))

    def _fake_full(self, leave: int) -> None:
        real_write, below, budget = os.write, str(self.folder), [leave]

        def under(target: object) -> bool:
            return str(target).startswith(below)

        def write(fd: int, data) -> int:
            if not under(os.readlink(f"/proc/self/fd/{fd}")):
                return real_write(fd, data)
            if budget[0] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            count = real_write(fd, bytes(data[:budget[0]]))
            budget[0] -= count
            return count

        def write_bytes(path: Path, data: bytes) -> int:
            if under(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_bytes(path, data)

        def save(tensors, filename, metadata=None):
            if under(filename):
                raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                   'message: "No space left on device" })')
            return real_save(tensors, filename, metadata=metadata)

        real_write_bytes, real_save = Path.write_bytes, safetensors.torch.save_file
        self._monkeypatch.setattr(os, "write", write)
        self._monkeypatch.setattr(Path, "write_bytes", write_bytes)
        self._monkeypatch.setattr(safetensors.torch, "save_file", save)

    def release(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    disk = SmallDisk(tmp_path / "small", monkeypatch)
    try:
        yield disk
    finally:
        disk.release()


def _progress(step: int) -> Progress:
    return Progress(step=step, total_steps=10, loss=0.5, percent=10.0 * step, lr=1e-4, it_per_s=1.0, eta_s=1.0,
                    epoch=0)


def test_a_full_disk_loses_no_event_to_the_caller_and_leaves_no_torn_line(small_disk, caplog):
    seen = []
    log = EventLog(small_disk.folder / "events.jsonl", seen.append)
    log(_progress(1))
    small_disk.fill(leave=4096)
    big = Error(message="x" * 20_000, step=2)  # longer than the space left: the write stops half way
    with caplog.at_level(logging.WARNING, logger="lora_core"):
        log(big)
        log(Complete(final_path="f", total_time=1.0, step=3))
    log.close()
    assert [event.type for event in seen] == ["progress", "error", "complete"]
    text = (small_disk.folder / "events.jsonl").read_bytes()
    assert text.endswith(b"\n")
    assert [json.loads(line)["type"] for line in text.splitlines()] == ["progress"]
    assert "cannot write" in caplog.text and "events.jsonl" in caplog.text


def test_a_killed_writers_torn_line_is_cut_before_the_next_event(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(_progress(1).to_json() + "\n" + '{"type": "progress", "st', encoding="utf-8")
    log = EventLog(path)
    log(Error(message="the training process died", step=1))
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["progress", "error"]
    assert [event.type for event in read_events(path)] == ["progress", "error"]


def test_a_refused_output_folder_gets_no_events_file(tmp_path):
    seen = []
    missing = tmp_path / "never-made"
    log = EventLog(missing / "events.jsonl", seen.append)
    log(Error(message="cannot write", field="output_path"))
    log.close()
    assert not missing.exists() and len(seen) == 1
    refused = tmp_path / "refused"
    refused.mkdir()
    log = EventLog(refused / "events.jsonl", seen.append)
    log(Error(message="less than 256 MB free", field="output_path"))
    log.close()
    assert list(refused.iterdir()) == [] and len(seen) == 2


def test_disk_full_errors_name_the_file_the_folder_and_the_space_needed(small_disk):
    small_disk.fill()
    target = small_disk.folder / "run" / "config.json"
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(target, "x" * 100_000)
    message = str(caught.value)
    assert "config.json" in message and str(target.parent) in message and "97.7 KB" in message
    assert caught.value.field == "output_path" and caught.value.errno == errno.ENOSPC
    tensors = {"w": torch.zeros(300_000)}  # 1.2 MB of float32
    with pytest.raises(DiskFullError) as caught:
        atomic_write(small_disk.folder / "lora.safetensors",
                     lambda tmp: safetensors.torch.save_file(tensors, str(tmp)),
                     needed=1_200_000)
    assert "lora.safetensors" in str(caught.value) and "1.1 MB" in str(caught.value)
    leftovers = [p.name for p in small_disk.folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".lora.safetensors.abc123.tmp").write_bytes(b"half")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".config.json.x.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours: no leading dot")
    removed = files.remove_stale_temporaries(tmp_path, recursive=True)
    assert sorted(p.name for p in removed) == [".config.json.x.tmp", ".lora.safetensors.abc123.tmp"]
    assert (tmp_path / "keep.tmp").exists()


def test_a_run_refused_for_its_output_folder_leaves_nothing_there(tmp_path, monkeypatch):
    from collections import namedtuple

    from helpers import SHAPES_DATASET, run_job_here, tiny_config

    from lora_core import plan
    from lora_core.configfile import parse_config

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda _folder: usage(10**9, 10**9 - 10**6, 10**6))
    output = tmp_path / "new" / "run"
    terminal, _ = run_job_here(parse_config(tiny_config(SHAPES_DATASET, output)))
    assert terminal.type == "error" and terminal.field == "output_path" and "256 MB" in terminal.message
    assert not (tmp_path / "new").exists(), "no folder, no events.jsonl, no report where the run was refused"
    assert plan.check_output_folder(str(output), keep=False) is not None and not (tmp_path / "new").exists()
