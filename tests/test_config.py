import json

import jsonschema
import pytest
from helpers import ROOT

from lora_core.config import ConfigError, TrainConfig
from lora_core.configfile import config_to_file_dict, json_schema, load_config, parse_config
from lora_core.plan import run_length, unbucketed_batches_per_epoch

BASE = {"dataset_path": "d", "base_model": "builtin:tiny-sd", "output_path": "o", "trigger_words": ["sks"]}


def problems(data) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return dict(caught.value.problems)


def test_defaults_match_the_documented_values():
    config = parse_config(BASE)
    assert (config.learning_rate, config.batch_size, config.epochs, config.steps) == (1e-4, 1, None, None)
    assert run_length(config, batches_per_epoch=10) == (1000, "default")  # neither given: 1000 steps
    assert (config.resolution, config.lora_rank, config.lora_alpha) == (512, 16, 32)
    assert (config.checkpoint_steps, config.validation_steps, config.gradient_accumulation_steps) == (500, 100, 1)
    assert config.mixed_precision == "auto"


def test_flat_and_nested_mean_the_same():
    options = {"learning_rate": 3e-4, "batch_size": 4, "lora_rank": 8, "sample_prompts": ["a sks dog"]}
    flat = parse_config({**BASE, **options})
    nested = parse_config({**BASE, "training_params": options})
    assert flat == nested
    assert parse_config(config_to_file_dict(flat)) == flat


def test_missing_required_fields_are_named():
    found = problems({"base_model": "builtin:tiny-sd"})
    assert {"dataset_path", "output_path", "trigger_words"} <= set(found)
    assert all(message == "is required" for message in found.values())


def test_unknown_key_is_an_error_with_a_suggestion():
    found = problems({**BASE, "learning_rat": 0.1})
    assert "did you mean 'learning_rate'" in found["learning_rat"]


def test_unknown_nested_key_is_an_error():
    assert "unknown field" in problems({**BASE, "training_params": {"bogus_option": 1}})["bogus_option"]


def test_wrong_type_names_the_field():
    assert "batch_size" in problems({**BASE, "batch_size": "four"})


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("batch_size", 65, "allowed range [1, 64]"),
    ("batch_size", 0, "allowed range [1, 64]"),
    ("lora_rank", 512, "allowed range [1, 256]"),
    ("resolution", 32, "allowed range [64, 2048], a multiple of 8"),
    ("resolution", 513, "a multiple of 8"),
    ("learning_rate", 0, "allowed range (0, 1.0]"),
    ("mixed_precision", "fp8", "choose one of 'auto', 'no', 'fp16', 'bf16'"),
])
def test_out_of_range_is_refused_with_the_range_not_clamped(field, value, expected):
    found = problems({**BASE, field: value})
    assert expected in found[field]
    assert json.dumps(value) in found[field]


def test_empty_trigger_words_and_blank_entries_are_refused():
    assert "at least 1 item" in problems({**BASE, "trigger_words": []})["trigger_words"]
    assert "must not be blank" in problems({**BASE, "trigger_words": ["a", " "]})["trigger_words"]


def test_a_single_trigger_word_string_is_one_word():
    assert parse_config({**BASE, "trigger_words": "sks"}).trigger_words == ["sks"]


def test_the_same_field_flat_and_nested_must_agree():
    assert "given twice" in problems({**BASE, "batch_size": 2, "training_params": {"batch_size": 4}})["batch_size"]
    assert parse_config({**BASE, "batch_size": 2, "training_params": {"batch_size": 2}}).batch_size == 2


def test_required_fields_may_not_hide_in_training_params():
    data = {key: value for key, value in BASE.items() if key != "output_path"}
    data["training_params"] = {"output_path": "o"}
    assert "training_params.output_path" in problems(data)


def test_checkpoint_and_validation_steps_may_exceed_steps():
    config = parse_config({**BASE, "steps": 10, "checkpoint_steps": 500, "validation_steps": 1000})
    assert config.checkpoint_steps > config.steps


def test_not_an_object_and_bad_json_file(tmp_path):
    assert "must be a JSON object" in problems([1, 2])["config"]
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")


def length(options: dict, num_images: int = 10):
    config = parse_config({**BASE, **options})
    return run_length(config, unbucketed_batches_per_epoch(config, num_images, num_processes=1))


def test_steps_decide_the_length_and_epochs_only_when_steps_are_not_given():
    assert length({"steps": 30, "epochs": 2}) == (30, "steps")
    assert length({"epochs": 3, "batch_size": 4}) == (9, "epochs")
    assert length({"epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2}) == (6, "epochs")
    assert length({}) == (1000, "default")
    assert parse_config(config_to_file_dict(parse_config({**BASE, "epochs": 3}))).steps is None  # saved as given


def test_schema_file_is_generated_from_the_model_and_in_sync():
    on_disk = json.loads((ROOT / "config_schema.json").read_text(encoding="utf-8"))
    assert on_disk == json_schema(), "config_schema.json is stale: run `python -m lora_core schema`"
    assert set(TrainConfig.model_fields) - {"training_params"} <= set(on_disk["properties"])


def test_example_config_and_presets_validate_against_schema_and_model():
    schema = json.loads((ROOT / "config_schema.json").read_text(encoding="utf-8"))
    files = [ROOT / "example_config.json", *sorted((ROOT / "presets").glob("*.json"))]
    assert len(files) >= 2
    for path in files:
        jsonschema.validate(json.loads(path.read_text(encoding="utf-8")), schema)
        load_config(path)


def test_schema_rejects_what_the_model_rejects():
    schema = json_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "training_params": {"batch_size": 100}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**BASE, "surprise": 1}, schema)
