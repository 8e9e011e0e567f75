"""The Hugging Face Space: README.md's front matter makes the repository a Gradio Space that can train."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

# https://huggingface.co/docs/hub/spaces-config-reference (colors) and the Spaces GPU hardware flavors
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
GPU_HARDWARE = {"t4-small", "t4-medium", "l4x1", "l4x4", "a10g-small", "a10g-large", "a10g-largex2",
                "a10g-largex4", "l40sx1", "l40sx4", "l40sx8", "a100-large", "a100x4", "a100x8", "h100", "h100x8"}


def front_matter(readme: Path) -> dict[str, object]:
    """The YAML between the leading `---` lines; PyYAML when installed, else flat `key: value` lines."""
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n", text, flags=re.S)
    assert match, f"{readme.name} does not start with a front matter block between '---' lines"
    try:
        import yaml
    except ImportError:
        data = {}
        for line in match.group(1).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition(":")
                value = value.strip()
                quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
                data[key.strip()] = value[1:-1] if quoted else _scalar(value)
        return data
    data = yaml.safe_load(match.group(1))
    assert isinstance(data, dict), "the front matter is not a YAML mapping"
    return data


def _scalar(value: str) -> object:
    if value in ("true", "false"):
        return value == "true"
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        return value


def space_problems(readme: Path, root: Path) -> list[str]:
    """Everything that would stop the Space from building or training; empty when it is right."""
    meta, problems = front_matter(readme), []
    if meta.get("sdk") != "gradio":
        problems.append(f"sdk must be gradio, got {meta.get('sdk')!r}")
    app = meta.get("app_file")
    if not isinstance(app, str) or not (root / app).is_file():
        problems.append(f"app_file {app!r} is not a file of the repository")
    if not (root / "requirements.txt").is_file():
        problems.append("requirements.txt is missing (the Space installs the engine from it)")
    version = meta.get("sdk_version")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        problems.append(f"sdk_version must be a full gradio version string, got {version!r}")
    else:
        wanted = [Requirement(line.split("#")[0]) for line in (root / "requirements.txt").read_text().splitlines()
                  if line.split("#")[0].strip().lower().startswith("gradio")]
        if wanted and not wanted[0].specifier.contains(Version(version)):
            problems.append(f"sdk_version {version} is outside requirements.txt's {wanted[0]}")
    python = meta.get("python_version")
    if not isinstance(python, str) or not re.fullmatch(r"3\.\d+", python) or int(python.split(".")[1]) < 10:
        problems.append(f"python_version must be a quoted string like \"3.11\" (3.10 or later), got {python!r}")
    if meta.get("suggested_hardware") not in GPU_HARDWARE:
        problems.append(f"suggested_hardware must be a GPU flavor, got {meta.get('suggested_hardware')!r}")
    if not meta.get("title"):
        problems.append("title is missing")
    for key in ("colorFrom", "colorTo"):
        if key in meta and meta[key] not in COLORS:
            problems.append(f"{key} {meta[key]!r} is not one of {sorted(COLORS)}")
    return problems


def test_the_readme_front_matter_makes_a_gradio_space_that_trains_on_a_gpu():
    assert space_problems(ROOT / "README.md", ROOT) == []
    assert front_matter(ROOT / "README.md")["app_file"] == "webui.py"


@pytest.mark.parametrize("parser", ["yaml", "fallback"])
def test_the_checks_catch_a_broken_front_matter(tmp_path, monkeypatch, parser):
    if parser == "fallback":
        monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    (tmp_path / "requirements.txt").write_text("gradio>=6.7,<7\n")
    (tmp_path / "app.py").write_text("")
    good = ("---\ntitle: LoRA Studio\nsdk: gradio\nsdk_version: 6.31.0\npython_version: \"3.11\"\n"
            "app_file: app.py\nsuggested_hardware: l40sx1\ncolorFrom: indigo\n---\n# text\n")
    (tmp_path / "README.md").write_text(good)
    assert space_problems(tmp_path / "README.md", tmp_path) == []
    broken = (good.replace("gradio\n", "streamlit\n", 1).replace("6.31.0", "5.9.1")
              .replace('"3.11"', "3.10").replace("app.py", "missing.py").replace("l40sx1", "cpu-basic"))
    (tmp_path / "README.md").write_text(broken)
    problems = " | ".join(space_problems(tmp_path / "README.md", tmp_path))
    for part in ("sdk must be gradio", "sdk_version 5.9.1", "python_version", "missing.py", "suggested_hardware"):
        assert part in problems
    (tmp_path / "README.md").write_text("# no front matter\n")
    with pytest.raises(AssertionError, match="front matter"):
        front_matter(tmp_path / "README.md")


def test_on_a_space_the_page_serves_the_network_and_keeps_outputs_where_the_environment_says(monkeypatch, tmp_path):
    webui = pytest.importorskip("webui")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what Spaces set for a gradio app
    monkeypatch.setenv("LORA_STUDIO_OUTPUTS", str(tmp_path / "persistent"))
    args = webui.parse_args([])
    assert args.host == "0.0.0.0" and args.outputs == str(tmp_path / "persistent")
