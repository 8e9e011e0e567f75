"""studio/runs.py on fake run folders: the Runs list, one run's view, compare and delete (no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from studio.runs import RunError, compare_runs, delete_run, list_runs, run_detail, table_rows


def _event(kind: str, second: int, **fields) -> dict:
    return {"type": kind, "timestamp": f"2026-12-01T10:{second // 60:02d}:{second % 60:02d}.000+00:00", **fields}


def _started(second: int, total: int = 10) -> dict:
    return _event("started", second, total_steps=total, num_images=4, device="cpu", mixed_precision="no",
                  model_family="sd15", output_path="x")


def _progress(second: int, step: int, loss: float, total: int = 10) -> dict:
    return _event("progress", second, step=step, total_steps=total, loss=loss, percent=step * 10.0, lr=1e-4,
                  it_per_s=1.0, eta_s=1.0, epoch=1)


def make_run(root: Path, name: str, events: list[dict], config: dict | None = None, stderr: str = "") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events) + '{"type": "pro',
                                         encoding="utf-8")  # a torn last line, as a killed process leaves
    (folder / "config.json").write_text(json.dumps(config or {"base_model": "builtin:tiny-sd",
                                                              "training_params": {"learning_rate": 1e-4}}))
    if stderr:
        (page_job(root, name) / "stderr.log").write_text(stderr)
    return folder


def page_job(root: Path, run: str, **record) -> Path:
    """The server's own folder of a training job of run `run` (studio/jobfiles.py), with its job.json."""
    folder = root / ".studio" / "jobs" / f"20261201-100000-{run}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps({"job_id": folder.name, "kind": "train", "target": str(root / run),
                                                 "started_at": "2026-12-01T10:00:00+00:00", **record}))
    return folder


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    return fill_outputs(tmp_path / "outputs")


def fill_outputs(root: Path) -> Path:
    """Runs in every state; `cli-killed` is a folder as a killed `train_lora.py --config` leaves it."""
    done = make_run(root, "done", [_started(0), _progress(5, 5, 0.5), _progress(9, 10, 0.25),
                                   _event("complete", 10, final_path=str(root / "done/lora.safetensors"),
                                          total_time=10.0, step=10)],
                    {"base_model": "builtin:tiny-sd", "output_path": str(root / "done"),
                     "training_params": {"learning_rate": 1e-4, "lora_rank": 4}})
    (done / "lora.safetensors").write_bytes(b"x")
    ckpt = root / "resumed/checkpoint-4.safetensors"
    resumed = make_run(root, "resumed", [
        _started(20), _progress(21, 2, 0.9), _progress(22, 4, 0.8),
        _event("checkpoint", 22, step=4, path=str(ckpt)),
        _event("interrupted", 23, step=4, message="stopped by the user", checkpoint_path=str(ckpt)),
        _started(30), _progress(31, 6, 0.7), _event("interrupted", 32, step=6, message="stopped by the user",
                                                     checkpoint_path=None)],
        {"base_model": "builtin:tiny-sd", "output_path": str(root / "resumed"),
         "training_params": {"learning_rate": 5e-4, "lora_rank": 4}})
    (resumed / "checkpoint-4.safetensors").write_bytes(b"y")
    make_run(root, "broken", [_started(40), _event("error", 41, message="dataset has no images",
                                                   field="dataset_path")], stderr="line1\nTraceback: boom\n")
    make_run(root, "cli-killed", [_started(50), _progress(51, 1, 1.0)])  # no final event, no job.json
    (root / "uploads").mkdir()
    (root / "uploads" / "events.jsonl").write_text("")
    (root / ".studio").mkdir(exist_ok=True)
    (root / ".studio" / "queue.json").write_text(json.dumps([{"job_id": "j9", "output_path": str(root / "waiting"),
                                                  "config": {"base_model": "builtin:tiny-sdxl"},
                                                  "queued_at": "2026-12-01T11:00:00+00:00"}]))
    return root


def test_list_runs_reads_every_run_newest_first_with_its_state(outputs: Path) -> None:
    rows = {row.id: row for row in list_runs(outputs)}
    assert [row.id for row in list_runs(outputs)] == ["waiting", "cli-killed", "broken", "resumed", "done"]
    assert rows["done"].state == "complete" and rows["done"].loss == 0.25 and rows["done"].step == 10
    assert rows["done"].duration_s == 10.0 and rows["done"].base_model == "builtin:tiny-sd"
    assert rows["resumed"].state == "stopped" and rows["resumed"].step == 6
    assert rows["broken"].state == "failed"
    assert rows["cli-killed"].state == "stopped"  # no process behind it: not presented as running
    assert rows["waiting"].state == "queued" and rows["waiting"].base_model == "builtin:tiny-sdxl"
    assert "uploads" not in rows
    assert table_rows([rows["done"]])[0][:4] == ["done", "complete", "builtin:tiny-sd", "10 / 10"]


def test_a_run_whose_process_lives_shows_as_running(outputs: Path) -> None:
    folder = outputs / "cli-killed"
    me = __import__("psutil").Process(os.getpid())
    page_job(outputs, folder.name, pid=os.getpid(), start_time=me.create_time())
    assert run_detail(outputs, "cli-killed").state == "running"
    page_job(outputs, folder.name, pid=os.getpid(), start_time=me.create_time() - 100)
    assert run_detail(outputs, "cli-killed").state == "stopped"  # the pid was reused by another process


def test_resumed_run_keeps_its_history_checkpoints_and_marks_the_resume(outputs: Path) -> None:
    detail = run_detail(outputs, "resumed")
    assert detail.loss_points == [(2, 0.9), (4, 0.8), (6, 0.7)]
    assert detail.resumed_at == [4]  # the step the resume continued from (the stop's checkpoint)
    assert [(item["step"], item["exists"]) for item in detail.checkpoints] == [(4, True)]
    assert detail.saved_so_far == str(outputs / "resumed/checkpoint-4.safetensors")  # Stop offers a download


def test_failed_run_shows_the_error_its_field_and_the_stderr_tail(outputs: Path) -> None:
    detail = run_detail(outputs, "broken")
    assert detail.message == "dataset has no images" and detail.error_field == "dataset_path"
    assert "Traceback: boom" in detail.stderr_tail
    done = run_detail(outputs, "done")
    assert done.final_path == done.saved_so_far and done.stderr_tail == []


def test_compare_returns_the_curves_and_only_the_differing_fields(outputs: Path) -> None:
    result = compare_runs(outputs, ["done", "resumed"])
    assert result["differing"] == {"learning_rate": {"done": 1e-4, "resumed": 5e-4}}
    assert result["curves"]["done"] == [(5, 0.5), (10, 0.25)]
    with pytest.raises(RunError, match="two or more"):
        compare_runs(outputs, ["done"])


@pytest.mark.parametrize("bad", ["", "..", "../outputs", "/etc", "uploads", "nope"])
def test_run_ids_outside_the_outputs_folder_are_refused(outputs: Path, bad: str) -> None:
    with pytest.raises(RunError) as caught:
        run_detail(outputs, bad)
    assert caught.value.field == "run"


def test_delete_removes_only_that_run_and_never_a_running_one(outputs: Path) -> None:
    jobs = [page_job(outputs, "done"), page_job(outputs, "resumed")]  # the server's records of their jobs
    assert delete_run(outputs, "done") == (outputs / "done").resolve()
    assert not (outputs / "done").exists() and (outputs / "resumed").is_dir()
    assert not jobs[0].exists() and jobs[1].is_dir()  # a deleted run's job records go with it
    assert "done" not in {row.id for row in list_runs(outputs)}
    with pytest.raises(RunError, match="still running"):
        delete_run(outputs, "cli-killed", running=True)
    assert (outputs / "cli-killed").is_dir()
    outside = outputs.parent / "elsewhere"
    make_run(outside.parent, "elsewhere", [_started(0)])
    (outputs / "link").symlink_to(outside)
    with pytest.raises(RunError):
        delete_run(outputs, "link")
    assert outside.is_dir()


# ----------------------------------------------------------------------------------------------------
# the Runs tab through gradio_client (a page with only that tab: no training needed)


@pytest.fixture(scope="module")
def runs_page(tmp_path_factory):
    import gradio as gr
    from gradio_client import Client

    from studio.runs_page import RunsTab

    root = fill_outputs(tmp_path_factory.mktemp("runs_page") / "outputs")
    tab = RunsTab(root, running=lambda: set())
    with gr.Blocks() as demo:
        tab.build()
        tab.wire(demo)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, allowed_paths=[str(root)])
    client = Client(url, verbose=False, download_files=str(root.parent / "downloads"))
    yield client, root
    client.close()
    demo.close()


def test_the_runs_endpoint_lists_cli_runs_and_compare_returns_the_differing_fields(runs_page):
    client, root = runs_page
    table, data, _ = client.predict(api_name="/runs")
    assert [row["id"] for row in data] == ["waiting", "cli-killed", "broken", "resumed", "done"]
    assert table["data"][1][:2] == ["cli-killed", "stopped"]
    _, _, result = client.predict(["done", "resumed"], api_name="/compare")
    assert result["differing"] == {"learning_rate": {"done": 1e-4, "resumed": 5e-4}}


def test_the_run_endpoint_opens_a_run_and_delete_needs_the_confirmation(runs_page):
    from gradio_client.exceptions import AppError

    client, root = runs_page
    summary, _, _, files, _, detail = client.predict("resumed", api_name="/open_run")
    assert detail["state"] == "stopped" and detail["resumed_at"] == [4] and "resumed at step(s): 4" in summary
    assert [Path(item).name for item in files] == ["checkpoint-4.safetensors"]
    with pytest.raises(AppError, match="tick"):
        client.predict("broken", False, api_name="/delete_run")
    assert (root / "broken").is_dir()
    message, _, data, _ = client.predict("broken", True, api_name="/delete_run")
    assert message == "deleted broken" and not (root / "broken").exists()
    assert "broken" not in [row["id"] for row in data]
    with pytest.raises(AppError, match="not a run id"):
        client.predict("../outputs", api_name="/open_run")
