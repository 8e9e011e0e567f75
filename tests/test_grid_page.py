"""The grid and the sweep on the page: named endpoints `grid` and `sweep` queue a job (`python -m lora_core
grid|sweep RUN ...`) through the same queue and device as training, followed like a training job, whose PNG
lands in the run folder. The pixel equalities (a grid cell is the trainer's sample, scale 0 is the base model,
scale 1 the fused LoRA) are the engine's, proven in tests/test_grid.py; here: the page path."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from helpers import launch_page, make_dataset, wait_for_job
from PIL import Image

from studio import sheets
from studio.runs_page import RunsTab

PROMPTS = ["a red square", "a blue circle"]
TINY = dict(base_model="builtin:tiny-sd", trigger_words="shapestyle", resolution=256, batch_size=1, lora_rank=4,
            lora_alpha=8, learning_rate=1e-2, train_text_encoder=True, text_encoder_lr=5e-2,
            sample_inference_steps=2, seed=7, validation_steps=1000, sample_prompts="\n".join(PROMPTS))
TERMINAL = ("complete", "failed", "stopped")


def wait_for(client: Client, job_id: str, done, timeout: float = 180.0) -> dict:
    return wait_for_job(client, job_id, done, timeout)


pytestmark = pytest.mark.xdist_group("test_grid_page")  # its tests share one trained run: one xdist worker


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_cache):
    """A launched app and one trained run (a checkpoint at step 2, the final LoRA at 4), shared by the tests
    that only draw from it: (client, studio, run folder, dataset)."""
    root = tmp_path_factory.mktemp("grid-page")
    dataset = make_dataset(root / "data", count=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        demo, studio, url = launch_page("--outputs", str(root / "outputs"))
        # (the first Start's dataset check imports torch in the server before it answers: 5 s and more under load)
        client = Client(url, verbose=False, download_files=str(root / "downloads"), httpx_kwargs={"timeout": 120})
        job = client.predict(dataset_path=str(dataset), run_name="drawn", steps=4, checkpoint_steps=2, **TINY,
                             api_name="/start")
        state = wait_for(client, job["job_id"], lambda s: s["state"] in TERMINAL)
        assert state["state"] == "complete", state
        yield client, studio, Path(state["output_path"]), dataset
        client.close()
        studio.shutdown(timeout=30)
        demo.close()


def cells(path: Path) -> tuple[list[list[np.ndarray]], dict]:
    """A sheet's cells (rows x columns, as arrays) cut out by the boxes its text chunk records."""
    with Image.open(path) as image:
        details = json.loads(image.text["lora_studio"])
        sheet = image.convert("RGB")
    return [[np.asarray(sheet.crop(tuple(box)), dtype=np.float32) for box in row] for row in details["boxes"]], details


@pytest.mark.e2e  # serves the page, trains a run and draws from it
def test_the_grid_is_queued_behind_training_then_drawn_into_the_run_folder(trained, tmp_path):
    client, studio, run, dataset = trained
    long = client.predict(dataset_path=str(dataset), run_name="busy", steps=5000, checkpoint_steps=5000,
                          **TINY, api_name="/start")
    assert long["state"] == "running"
    grid = client.predict(run.name, ["2", "final"], "\n".join(PROMPTS), api_name="/grid")
    assert grid["state"] == "queued" and grid["position"] == 1  # one device: it waits for the training
    assert [job["job_id"] for job in client.predict(api_name="/queue")] == [grid["job_id"]]
    wait_for(client, long["job_id"], lambda s: s["state"] == "running")
    assert client.predict(api_name="/stop")["job_id"] == long["job_id"]

    done = wait_for(client, grid["job_id"], lambda s: s["state"] in TERMINAL)
    assert done["state"] == "complete", done
    assert done["step"] == done["total_steps"] == 4  # cells drawn read as a training job's steps
    path = Path(done["final_path"])
    assert path.parent == run and path.name.startswith("grid_") and path.suffix == ".png"
    rows, details = cells(path)
    assert details["steps"] == ["step 2", "final (step 4)"] and details["prompts"] == PROMPTS
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 2 * 256 and image.height > 2 * 256
    assert all(cell.shape == (256, 256, 3) for row in rows for cell in row)  # the run's resolution
    for column in range(2):  # same prompt and seed: the checkpoints make the difference
        assert np.abs(rows[0][column] - rows[1][column]).mean() > 1.0
    assert studio.view().job_id == long["job_id"]  # the Train panel still shows training, not the grid


@pytest.mark.e2e  # serves the page, trains a run and draws from it
def test_the_sweeps_scale_0_is_the_base_model_whichever_lora_it_sweeps(trained):
    client, studio, run, _ = trained
    drawn = {}
    for step in ("2", "final"):
        job = client.predict(run.name, step, PROMPTS[0], "0, 1", api_name="/sweep")
        done = wait_for(client, job["job_id"], lambda s: s["state"] in TERMINAL)
        assert done["state"] == "complete", done
        drawn[step], details = cells(Path(done["final_path"]))
        assert details["scales"] == [0.0, 1.0] and Path(done["final_path"]).parent == run
    assert np.array_equal(drawn["2"][0][0], drawn["final"][0][0])  # scale 0: no LoRA at all
    assert np.abs(drawn["2"][0][1] - drawn["final"][0][1]).mean() > 1.0  # scale 1: each its own LoRA


@pytest.mark.e2e  # serves the page, trains a run and draws from it
def test_grid_options_the_run_cannot_draw_are_refused_before_queueing(trained):
    client, studio, run, _ = trained
    with pytest.raises(AppError, match="no LoRA saved at '7'; it has 2, final"):
        client.predict(run.name, ["7"], "", api_name="/grid")
    with pytest.raises(AppError, match="scales: 1 to 16 numbers"):
        client.predict(run.name, "final", "", "0, 9", api_name="/sweep")
    with pytest.raises(AppError, match="not a run id"):
        client.predict("../elsewhere", [], "", api_name="/grid")
    assert client.predict(api_name="/queue") == []


@pytest.mark.e2e  # serves the page, trains a run and draws from it
def test_the_opened_run_offers_its_checkpoints_and_prompts_and_the_page_follows_the_job(trained):
    client, studio, run, _ = trained
    tab = RunsTab(studio.outputs_root, studio=studio)
    with gr.Blocks():  # the handlers answer by component
        tab.build()
    form = tab.sheet_form(run.name)
    steps, prompts, sweep_step = form[tab.grid_steps], form[tab.grid_prompts], form[tab.sweep_step]
    assert steps["choices"] == [("step 2", "2"), ("final", "final")]
    assert steps["value"] == ["2", "final"] and sweep_step["value"] == "final"
    assert prompts.splitlines() == PROMPTS
    assert sheets.grid_args(run, None, None) == ["--steps", "2", "final"]  # the default: all, capped
    assert tab.drawing() is None
    submitted = tab.grid(run.name, ["final"], PROMPTS[0])
    assert tab.drawing() == {"job_id": submitted["job_id"]}  # what a page opened now follows
    shown = list(tab.follow(submitted))
    states = [status for status, _, _ in shown]
    assert 'data-state="complete"' in states[-1]
    assert any("drawing cell" in status or "loading" in status or "waiting" in status for status in states[:-1])
    image, download = shown[-1][1:]
    assert image == download and image["visible"] is True
    assert Path(image["value"]).parent == run and Path(image["value"]).name.startswith("grid_")
    reopened = tab.sheet_form(run.name)[tab.sheet_image]["value"]
    assert Path(reopened) == sheets.newest_sheet(run) and tab.drawing() is None  # shown again when reopened


@pytest.mark.e2e  # a server, a trained run or a whole model written: not the quick subset
def test_a_grid_and_a_sweep_killed_while_they_start_each_end_with_one_final_event(trained):
    from helpers import wait_until

    from lora_core.eventlog import read_events

    _, studio, run, _ = trained
    for kind, args in (("grid", ["--steps", "final"]), ("sweep", ["--step", "final", "--scales", "0", "1"])):
        job_id = studio.submit_tool(kind, run, [*args, "--prompts", PROMPTS[0]]).job_id
        wait_until(lambda key=job_id: key in studio._active and studio._active[key].process.pid, 120,
                   what=f"the {kind}'s process")
        studio._active[job_id].process.kill()  # SIGKILL: the job itself can write no final event
        view = studio.wait(job_id, timeout=120)
        events = read_events(Path(view.output_path) / "events.jsonl")
        assert view.state == "failed" and "signal 9" in view.message, view.message
        assert sum(event.terminal for event in events) == 1  # the server's, once


def test_the_options_become_the_command_line_of_the_job(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (10, 5, 20):
        (run / "checkpoints" / f"lora_step_{step}.safetensors").write_bytes(b"")
    (run / "lora_final.safetensors").write_bytes(b"")
    assert [value for _, value in sheets.saved_choices(run)] == ["5", "10", "20", "final"]
    assert sheets.grid_args(run, ["final", "5", "final"], "a\n\n b ") == ["--steps", "final", "5", "--prompts",
                                                                          "a", "b"]
    assert sheets.sweep_args(run, "10", "", "0 0.5, 1") == ["--step", "10", "--scales", "0", "0.5", "1"]
    assert sheets.sweep_args(run, "", "x", None)[:2] == ["--scales", "0"]  # the newest LoRA, default scales
    with pytest.raises(sheets.SheetError, match="starts with '-'"):
        sheets.grid_args(run, None, "-oops")
    assert len(sheets.grid_args(run, ["5", "10", "20", "final"], "\n".join(f"p{i}" for i in range(16)))) == 22
    (run / "checkpoints" / "lora_step_30.safetensors").write_bytes(b"")
    with pytest.raises(sheets.SheetError, match="5 x 16 cells is more than 64"):
        sheets.grid_args(run, None, "\n".join(f"p{i}" for i in range(16)))
    assert sheets.spread(list(range(20)), 8) == [0, 3, 5, 8, 11, 14, 16, 19]


def test_the_page_refuses_what_the_grid_command_refuses_under_the_same_field(tmp_path):
    from lora_core.grid import GridError, GridOptions, SweepOptions, parse_options

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in range(1, 18):
        (run / "checkpoints" / f"lora_step_{step}.safetensors").write_bytes(b"")
    steps, prompts = [str(step) for step in range(1, 18)], [f"p{i}" for i in range(17)]
    refused = [(sheets.grid_args, (run, steps, "p"), GridOptions, {"steps": steps}, "17 checkpoints, at most 16"),
               (sheets.grid_args, (run, ["1"], prompts), GridOptions, {"prompts": prompts}, "17 prompts, at most 16"),
               (sheets.sweep_args, (run, "1", "p", "0, 4.5"), SweepOptions, {"scales": [0, 4.5]}, "from -2 to 4"),
               (sheets.sweep_args, (run, "1", "p", [0.0] * 17), SweepOptions, {"scales": [0.0] * 17}, "1 to 16")]
    for page, args, model, options, words in refused:
        with pytest.raises(sheets.SheetError, match=words) as on_page:
            page(*args)
        with pytest.raises(GridError) as on_command_line:
            parse_options(model, options)
        assert on_page.value.field == on_command_line.value.field == next(iter(options))
    assert sheets.sweep_args(run, "1", "p", "-2, 4")[-4:-2] == ["-2", "4"]  # the bounds themselves are taken
    assert sheets.grid_args(run, steps[:16], "p")[:2] == ["--steps", "1"]
