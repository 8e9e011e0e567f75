"""Model folders with parts missing or broken are `base_model` errors that say what is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, SHAPES_DATASET, tiny_config

from lora_core import builtin, models
from lora_core.models import ModelError


@pytest.fixture
def model_folder(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(builtin.builtin_folder("tiny-sd"), target)
    return target


def test_a_folder_without_its_unet_config_names_what_is_missing(model_folder):
    (model_folder / "unet" / "config.json").unlink()
    with pytest.raises(ModelError) as caught:
        models.inspect(models.resolve(str(model_folder)))
    assert caught.value.field == "base_model" and "unet/config.json" in str(caught.value)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_an_invalid_model_index_is_a_base_model_error(model_folder, content):
    (model_folder / "model_index.json").write_bytes(content)
    with pytest.raises(ModelError, match="model_index.json"):
        models.inspect(models.resolve(str(model_folder)))


@pytest.mark.e2e  # a CLI process of its own
def test_validate_only_names_base_model_without_a_traceback(model_folder, tmp_path):
    (model_folder / "unet" / "config.json").unlink()
    (model_folder / "vae" / "config.json").write_text("{}", encoding="utf-8")
    config = tiny_config(SHAPES_DATASET, tmp_path / "out")
    config["base_model"] = str(model_folder)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(path), "--validate-only"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=os.environ.copy())
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    problems = report.get("problems") or [report]
    assert any(item.get("field") == "base_model" and "unet/config.json" in item["message"] for item in problems)
