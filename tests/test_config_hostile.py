"""Configs that must be errors: wrong JSON types, unreadable files, paths no file system holds, text too long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from lora_core.config import ConfigError
from lora_core.configfile import load_config, parse_config
from studio.formspec import form_to_config_dict

BASE = {"dataset_path": "data", "base_model": "builtin:tiny-sd", "output_path": "out", "trigger_words": ["t"]}


def problem_fields(data) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return [field for field, _ in caught.value.problems]


@pytest.mark.parametrize(("field", "value"), [
    ("steps", "2"), ("steps", True), ("steps", 2.5), ("bucketing", "yes"), ("bucketing", 1),
    ("learning_rate", "1e-4"), ("learning_rate", False), ("lora_rank", "16"), ("trigger_words", [1]),
])
def test_json_values_of_the_wrong_type_are_errors_not_converted(field, value):
    assert [name.split(".")[0] for name in problem_fields({**BASE, field: value})] == [field]


def test_integers_still_count_as_numbers_and_the_page_form_still_converts_its_widgets():
    assert parse_config({**BASE, "learning_rate": 1, "lora_alpha": 32}).learning_rate == 1.0
    form = {**BASE, "trigger_words": "a, b", "steps": 12.0, "lora_rank": 8.0, "bucketing": True}
    config = parse_config(form_to_config_dict(form), strict=False)
    assert config.steps == 12 and config.lora_rank == 8 and config.trigger_words == ["a", "b"]


@pytest.mark.parametrize("field", ["dataset_path", "output_path", "base_model"])
def test_paths_no_file_system_holds_are_refused_by_field(field):
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, field: "data\x00/../etc"})
    assert caught.value.field == field and "NUL" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, field: "a" * 3_000_000})
    assert caught.value.field == field and "4096" in str(caught.value)
    assert len(str(caught.value)) < 1000  # the megabyte value is not echoed back


def test_text_that_no_text_encoder_can_read_is_refused():
    assert problem_fields({**BASE, "trigger_words": ["x" * 201]}) == ["trigger_words.0"]
    assert problem_fields({**BASE, "trigger_words": [f"w{i}" for i in range(1_000_000)]}) == ["trigger_words"]
    assert problem_fields({**BASE, "sample_prompts": ["p" * 2001]}) == ["sample_prompts.0"]


def test_deep_nesting_is_an_error_naming_the_field():
    deep = [[]]
    for _ in range(5000):
        deep = [deep]
    assert problem_fields({**BASE, "sample_prompts": deep})[0].startswith("sample_prompts")
    assert problem_fields({**BASE, "training_params": {"steps": deep}})[0].startswith("steps")


BAD_FILES = {
    "latin1": b'{"dataset_path": "caf\xe9"}',
    "deep": b"[" * 200_000 + b"]" * 200_000,
    "huge_int": b'{"steps": ' + b"9" * 5000 + b"}",
    "not_json": b"steps = 2",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_config_files_are_one_config_error(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "config" and path.name in str(caught.value)


def test_config_paths_that_are_not_files(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for path, words in [(fifo, "not a regular file"), (tmp_path, "not a regular file"),
                        (str(tmp_path / "a\x00b.json"), "null"), ("x" * 1_000_000, "too long")]:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert words in str(caught.value) and len(str(caught.value)) < 1000


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_lora.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=os.environ.copy())


@pytest.mark.parametrize("case", ["latin1", "deep", "nul_path", "huge_path"])
@pytest.mark.parametrize("validate_only", [False, True])
def test_the_cli_reports_one_error_and_exits_one_without_a_traceback(tmp_path, case, validate_only):
    if case in BAD_FILES:
        path = tmp_path / "config.json"
        path.write_bytes(BAD_FILES[case])
    else:
        value = "out\x00put" if case == "nul_path" else "o" * 1_000_000
        path = tmp_path / "config.json"
        path.write_text(json.dumps({**BASE, "output_path": value}), encoding="utf-8")
    result = _cli("--config", str(path), *(["--validate-only"] if validate_only else []))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 5000
    event = json.loads(lines[0])
    fields = [event.get("field")] + [item["field"] for item in event.get("problems", [])]
    assert ("output_path" if case in ("nul_path", "huge_path") else "config") in fields
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_config_does_not_block_the_cli(tmp_path):
    fifo = Path(tmp_path / "config.json")
    os.mkfifo(fifo)
    result = _cli("--config", str(fifo))
    assert result.returncode == 1 and "not a regular file" in json.loads(result.stdout)["message"]


def test_every_data_path_field_is_held_to_the_datasets_root(tmp_path):
    from lora_core.config import TrainConfig
    from lora_core.config_paths import data_path_fields
    from studio.jobs import Studio
    from studio.train_form import PageSettings, build_config, default_form
    from studio.uploads import UploadLimits

    assert {"dataset_path", "validation_dataset_path"} <= set(data_path_fields(TrainConfig))
    inside, outside = tmp_path / "datasets" / "cats", tmp_path / "private"
    inside.mkdir(parents=True)
    outside.mkdir()
    (inside / "escape").symlink_to(outside, target_is_directory=True)
    studio = Studio(tmp_path / "outputs", devices=0)
    settings = PageSettings(initial={}, upload_limits=UploadLimits(), datasets_root=(tmp_path / "datasets").resolve())
    form = {**default_form(), "dataset_path": str(inside), "trigger_words": "zwx", "base_model": "builtin:tiny-sd"}
    assert build_config(form, studio, settings).dataset_path == str(inside)
    for field, value in (("validation_dataset_path", str(outside)), ("dataset_path", str(outside)),
                         ("validation_dataset_path", str(inside / "escape"))):
        with pytest.raises(ConfigError) as error:
            build_config({**form, field: value}, studio, settings)
        assert [name for name, _ in error.value.problems] == [field]
        assert "only trains on uploads or folders inside" in error.value.problems[0][1]


def test_a_stored_config_resumed_or_rerun_is_held_to_the_datasets_root(tmp_path):
    """Resume and Rerun take their config from the run's files, which are data: a job_config.json naming a
    folder outside the datasets root is refused as the form would be, and nothing is queued."""
    import gradio as gr

    from lora_core.configfile import config_to_file_dict, parse_config
    from lora_core.eventlog import EventLog
    from lora_core.events import Interrupted, Started
    from studio.jobs import Studio
    from studio.runs_page import RunsTab
    from studio.train_form import PageSettings
    from studio.uploads import UploadLimits

    outside = tmp_path / "private"
    outside.mkdir()
    run = tmp_path / "outputs" / "stopped"
    run.mkdir(parents=True)
    config = parse_config({"dataset_path": str(outside), "base_model": "builtin:tiny-sd", "output_path": str(run),
                           "trigger_words": ["zwx"], "steps": 4})
    # as an older server left a page job's files, in the run folder (a new server moves them to .studio/jobs)
    (run / "job_config.json").write_text(json.dumps(config_to_file_dict(config)), encoding="utf-8")
    (run / "job.json").write_text(json.dumps({"job_id": "j-old", "token": "t", "pid": 0, "started_at": "2026-01-01"}))
    log = EventLog(run / "events.jsonl")
    log(Started(total_steps=4, num_images=2, device="cpu", mixed_precision="no", model_family="SD 1.x",
                output_path=str(run)))
    log(Interrupted(step=2, message="stopped", checkpoint_path=None))
    log.close()
    studio = Studio(tmp_path / "outputs", devices=0)
    try:
        settings = PageSettings(initial={}, upload_limits=UploadLimits(), datasets_root=(tmp_path / "data").resolve())
        with pytest.raises(gr.Error, match="only trains on uploads or folders inside"):
            RunsTab(studio.outputs_root, studio=studio, settings=settings).resume("stopped")
        assert studio.queued() == [] and studio.running() == []
    finally:
        studio.shutdown()
