"""The outputs folder as hostile data: FIFOs, links out, malformed events and names, huge and sparse event files.
Every file the Runs list or an opened run reads is data; what is wrong costs that one run, never the server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_runs import _event, _progress, _started, make_run, page_job
from timeouts import within

from lora_core.runrecord import MAX_POINTS
from studio import runs
from studio.jobview import folder_view
from studio.runs import RunError, delete_run, list_runs, run_detail


def _rows(root: Path) -> dict[str, runs.RunRow]:
    return {row.id: row for row in within(20, list_runs, root)}


def test_a_fifo_named_config_or_events_never_hangs_the_runs_list(tmp_path: Path) -> None:
    make_run(tmp_path, "good", [_started(0), _progress(1, 1, 0.5)])
    fifo_config = make_run(tmp_path, "fifo-config", [_started(2), _progress(3, 2, 0.4)])
    (fifo_config / "config.json").unlink()
    os.mkfifo(fifo_config / "config.json")
    fifo_events = tmp_path / "fifo-events"
    fifo_events.mkdir()
    os.mkfifo(fifo_events / "events.jsonl")
    page_job(tmp_path, "fifo-events")  # started by the page: a run from then on
    rows = _rows(tmp_path)
    assert rows["good"].step == 1 and rows["fifo-config"].step == 2 and rows["fifo-config"].base_model == ""
    assert "fifo-events" in rows and "not a regular file" in rows["fifo-events"].problem
    assert within(20, run_detail, tmp_path, "fifo-config").step == 2


def test_an_opened_run_offers_only_regular_files_inside_its_folder(tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    monkeypatch.chdir(secret.parent)  # the server's working folder: a relative path must not resolve there
    root = tmp_path / "outputs"
    folder = root / "run"
    folder.mkdir(parents=True)
    (folder / "samples").mkdir()
    (folder / "samples" / "ok.png").write_bytes(b"png")
    (folder / "link.png").symlink_to(secret)
    (folder / "linked-folder").symlink_to(secret.parent, target_is_directory=True)
    (folder / "lora.safetensors").write_bytes(b"x")
    names = [str(secret), "secret.png", "../elsewhere/secret.png", str(folder / "link.png"),
             str(folder / "linked-folder" / "secret.png"), "/tmp/../" + str(secret), str(folder / "samples" / "ok.png")]
    events = [_started(0), *(_event("sample", 1, step=1, prompt=f"p{index}", image_path=name)
                             for index, name in enumerate(names)),
              *(_event("checkpoint", 2, step=index + 1, path=name) for index, name in enumerate(names[:-1])),
              _event("complete", 3, final_path=str(secret), total_time=1.0, step=5)]
    (folder / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    detail = within(20, run_detail, root, "run")
    assert [item["path"] for item in detail.samples] == [str(folder / "samples" / "ok.png")]
    assert not any(item["exists"] or item["path"] for item in detail.checkpoints)
    assert detail.final_path is None and detail.saved_so_far is None


def test_delete_never_follows_a_link_and_never_leaves_the_outputs_folder(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    real = make_run(tmp_path, "real-run", [_started(0)])  # outside the outputs folder
    keep = make_run(root, "keep", [_started(0)])
    (root / "alias").symlink_to(real, target_is_directory=True)
    (root / "alias-of-keep").symlink_to(keep, target_is_directory=True)
    for name in ("alias", "alias-of-keep", "../real-run"):
        with pytest.raises(RunError):
            delete_run(root, name, running=False)
    assert (real / "events.jsonl").is_file() and (keep / "events.jsonl").is_file()
    assert set(_rows(root)) == {"keep"}  # a link is not listed as a run either
    victim = make_run(root, "victim", [_started(0)])
    (victim / "out").symlink_to(real, target_is_directory=True)
    delete_run(root, "victim", running=False)
    assert not victim.exists() and (real / "events.jsonl").is_file()  # the link went, not what it points to


def test_malformed_runs_cost_only_themselves(tmp_path: Path) -> None:
    make_run(tmp_path, "good", [_started(0), _progress(1, 1, 0.5)])
    infinite = make_run(tmp_path, "infinite", [_started(5), _progress(6, 1, 0.9)],
                        {"base_model": "x", "max_train_steps": 10})
    with open(infinite / "events.jsonl", "a", encoding="utf-8") as handle:  # after the torn line make_run left
        handle.write('\n{"type": "progress", "timestamp": "2026-12-01T10:00:07.000+00:00", "step": Infinity, '
                     '"total_steps": 10, "loss": 1, "percent": 1, "lr": 1, "it_per_s": 1, "eta_s": 1, "epoch": 0}\n')
        handle.write(json.dumps(_event("progress", 8, step="2", total_steps=[], loss="x", percent=0, lr=0,
                                       it_per_s=0, eta_s=0, epoch=0)) + "\n")
    (infinite / "config.json").write_text('{"base_model": "x", "max_train_steps": Infinity}')
    newest = make_run(tmp_path, "newest", [_started(50)])
    (newest / "events.jsonl").write_bytes(b'{"type": "started", "timestamp": [], "total_steps": "ten"}\n\xff\xfe\n')
    os.mkdir(os.fsencode(tmp_path) + b"/bad-\xff-name")
    open(os.fsencode(tmp_path) + b"/bad-\xff-name/events.jsonl", "wb").close()
    rows = _rows(tmp_path)
    assert rows["good"].step == 1 and rows["infinite"].step == 1 and rows["infinite"].total_steps == 10
    damaged = [row for row in rows.values() if row.state == runs.DAMAGED]
    assert len(damaged) == 1 and "UTF-8" in damaged[0].problem and damaged[0].id == "bad-\\xff-name"
    json.dumps([row.to_dict() for row in rows.values()], allow_nan=False)  # what the page sends is valid JSON
    assert [folder.name for folder in runs.run_folders(tmp_path)] == ["good", "infinite", "newest"]
    view = folder_view(newest)
    assert view is not None and view.step == 0
    for bad in ("a\0b", "x" * 300, "\x1b[31m", "bad-\\xff-name"):
        with pytest.raises(RunError, match="run"):
            run_detail(tmp_path, bad)


def test_a_huge_events_file_is_read_incrementally_with_a_thinned_curve(tmp_path: Path) -> None:
    folder = tmp_path / "long"
    folder.mkdir()
    line = ('{"type": "progress", "timestamp": "2026-12-01T10:00:00.000+00:00", "step": %d, "total_steps": 60000, '
            '"loss": 0.5, "percent": 1.0, "lr": 0.0001, "it_per_s": 1.0, "eta_s": 1.0, "epoch": 1}\n')
    with open(folder / "events.jsonl", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(_started(0, total=60000)) + "\n")
        handle.write("".join(line % step for step in range(1, 60001)))
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "events.jsonl", "wb") as handle:
        handle.write((json.dumps(_started(0)) + "\n").encode())
        handle.truncate(1024**3)  # 1 GB of zeros that take no disk: one endless line
    first = _rows(tmp_path)
    assert "sparse" in first and first["sparse"].state == "stopped"
    for _ in range(100):  # each call reads on from where the last stopped
        rows = _rows(tmp_path)
        if not rows["long"].problem and not rows["sparse"].problem:
            break
    assert rows["long"].step == 60000 and rows["long"].total_steps == 60000
    detail = within(20, run_detail, tmp_path, "long")
    assert 500 <= len(detail.loss_points) <= 2 * MAX_POINTS and detail.loss_points[-1][0] > 59000
    steps = [step for step, _ in detail.loss_points]
    assert len({b - a for a, b in zip(steps, steps[1:], strict=False)}) == 1  # evenly spaced


def test_sheets_named_by_a_fifo_or_a_link_out_are_not_read_or_offered(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from studio.sheets import newest_sheet

    folder = make_run(tmp_path, "run", [_started(0)])
    info = PngInfo()
    info.add_text("lora_studio", json.dumps({"kind": "grid"}))
    Image.new("RGB", (8, 8)).save(folder / "grid_1.png", pnginfo=info)
    os.mkfifo(folder / "grid_2.png")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside, pnginfo=info)
    (folder / "sweep_3.png").symlink_to(outside)
    assert within(20, newest_sheet, folder) == folder / "grid_1.png"


def test_read_events_never_blocks_on_a_fifo_nor_holds_a_sparse_line(tmp_path: Path) -> None:
    from lora_core.eventlog import read_events

    os.mkfifo(tmp_path / "fifo.jsonl")
    with pytest.raises(OSError, match="not a regular file"):
        within(20, read_events, tmp_path / "fifo.jsonl")
    with open(tmp_path / "sparse.jsonl", "wb") as handle:
        handle.write((json.dumps(_started(0)) + "\n").encode())
        handle.truncate(256 * 1024**2)  # zeros that take no disk: one endless line
        handle.seek(0, os.SEEK_END)
        handle.write(("\n" + json.dumps(_progress(1, 1, 0.5)) + "\n").encode())
    assert [event.type for event in within(20, read_events, tmp_path / "sparse.jsonl")] == ["started", "progress"]
