"""Issue 27's rough edges, where a function decides them: plain words for the form's problems, the queue in
words, a slow step's speed and a busy machine said, a finished run kept in reach after a failure."""

from __future__ import annotations

import tempfile

from studio import render
from studio.form_words import refusal
from studio.jobs import Studio
from studio.jobview import RunView
from studio.train_form import PageSettings, build_config, default_form
from studio.uploads import UploadLimits


def problems_of(**changes) -> dict[str, str]:
    from lora_core.config import ConfigError

    studio = Studio(tempfile.mkdtemp(prefix="edges-"))
    form = {**default_form(), "dataset_path": "/data", "trigger_words": "zwx", **changes}
    try:
        build_config(form, studio, PageSettings(form, UploadLimits()))
    except ConfigError as error:
        return dict(error.problems)
    finally:
        studio.shutdown(timeout=5)
    return {}


def test_the_forms_problems_are_plain_words_naming_the_fields_label():
    problems = problems_of(dataset_path="", trigger_words="", steps=-5, learning_rate=5, resolution=65,
                           optimizer="sgd-ish")
    assert problems["dataset_path"].startswith("Dataset folder is empty: upload images")
    assert problems["trigger_words"].startswith("Trigger words are empty")
    assert problems["steps"] == "Steps must be at least 1 (you gave -5)."
    assert problems["learning_rate"] == "Learning rate must be at most 1 (you gave 5)."
    assert problems["resolution"] == "Resolution must be a multiple of 8 (you gave 65); the nearest is 64."
    assert problems["optimizer"].startswith("Optimizer must be one of 'adamw'")
    assert not [text for text in problems.values() if "should" in text or "Input" in text]
    note = refusal(list(problems.items()))
    assert note.startswith("**Not started.**") and note.count("\n- ") == len(problems)
    assert refusal([]) == "" and problems_of() == {}


def test_the_queue_says_run_kind_model_and_steps_not_ids():
    train = {"job_id": "20260101-000000-abcdef", "position": 1, "output_path": "/out/my-lora-2", "resume": False,
             "queued_at": "2026-01-01T10:11:12+00:00", "kind": "train", "base_model": "builtin:toy-sd",
             "steps": 300}
    grid = {**train, "job_id": "x-grid-1", "position": 2, "output_path": "/out/.studio/jobs/x-grid-1",
            "target": "/out/my-lora", "kind": "grid", "base_model": None, "steps": None}
    assert render.queue_label(train) == "1. my-lora-2 · train · builtin:toy-sd · 300 steps"
    assert render.queue_label(grid) == "2. my-lora · grid"
    assert render.queue_label({**train, "resume": True}).startswith("1. my-lora-2 · resume")
    rows = render.queue_rows([train, grid])
    assert rows[0] == [1, "my-lora-2", "train", "builtin:toy-sd", 300, "10:11:12"]
    assert not any("abcdef" in str(cell) for row in rows for cell in row)
    assert len(rows[0]) == len(render.QUEUE_HEADERS)


def test_slow_steps_show_seconds_per_step_and_a_busy_machine_is_named():
    assert render.step_speed(2.5) == "2.50 it/s" and render.step_speed(0.25) == "4.0 s/step"
    assert render.load_note(1.5, 2) == ""
    assert render.load_note(7.8, 2).startswith("The machine is busy (load 7.8 on 2 cores)")


def test_after_a_failure_the_last_finished_run_stays_in_reach():
    from studio.train_tab import FINAL_LABEL, final_label

    failed = RunView(job_id="j2", state="failed", output_path="/out/hub-run", message="cannot reach the hub")
    done = RunView(job_id="j1", state="complete", output_path="/out/demo", final_path="/out/demo/lora_final.st")
    shown = render.status_html(failed, kept=done)
    assert "cannot reach the hub" in shown and "The last finished run, demo, is unchanged" in shown
    assert final_label(failed, done, done.final_path) == "Download the last finished LoRA (demo)"
    assert final_label(done, None, done.final_path) == FINAL_LABEL


def test_a_failed_run_without_a_folder_is_not_sent_to_the_runs_tab(tmp_path):
    gone = RunView(job_id="j1", state="failed", output_path=str(tmp_path / "never-started"), message="no hub")
    assert "left no run folder" in render.status_html(gone, earlier=True)
    (tmp_path / "never-started").mkdir()
    assert "the Runs tab has its details" in render.status_html(gone, earlier=True)


def test_ticking_bucketing_widens_the_bucket_range_to_the_resolution():
    from lora_core.configfile import load_config
    from studio.train_actions import TrainActions
    from studio.train_form import DEMO_PRESET

    demo = default_form(load_config(DEMO_PRESET))  # 64 px, bucketing off, buckets from 256 px
    low, high = TrainActions.bucket_range(True, demo["resolution"], demo["min_bucket_resolution"],
                                          demo["max_bucket_resolution"])
    assert (low, high) == (64, demo["max_bucket_resolution"])
    assert problems_of(**{**demo, "dataset_path": "/data", "bucketing": True}) != {}  # the error it avoids
    assert problems_of(**{**demo, "dataset_path": "/data", "bucketing": True, "min_bucket_resolution": low}) == {}
    assert TrainActions.bucket_range(True, 512, 256, 2048) == (256, 2048)  # inside already: unchanged


def test_start_refuses_a_model_the_picker_already_found_unusable(tmp_path):
    from helpers import SHAPES_DATASET

    from studio.train_actions import TrainActions

    studio = Studio(tmp_path / "outputs")
    form = {**default_form(), "dataset_path": str(SHAPES_DATASET), "trigger_words": "zwx",
            "base_model": "someone/unreachable"}
    actions = TrainActions(studio, PageSettings(form, UploadLimits()))
    try:
        assert actions.start_problems(form) == []  # not checked by the picker: the job says what is wrong
        actions.model_problems["someone/unreachable"] = "cannot reach huggingface.co"
        (field, message), = actions.start_problems(form)
        assert field == "base_model" and message.startswith("Base model: cannot reach huggingface.co.")
        assert "Not started" in actions.start_note_text(**form) and studio.queued() == []
    finally:
        studio.shutdown(timeout=5)
