"""training_report.html from events.jsonl, and TensorBoard logs fed from the event stream."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import run_job_here, tiny_config
from PIL import Image

from lora_core.configfile import parse_config
from lora_core.eventlog import EventLog
from lora_core.events import Checkpoint, Complete, Progress, Sample, Started
from lora_core.plan import plan_report
from lora_core.report import REPORT_NAME, write_report
from lora_core.tracking import TrackerUnavailable, open_tracker

LOSSES = [0.9, 0.7, 0.8, 0.5, 0.6, 0.4]


def record_run(output: Path, prompt: str = "shapestyle <b>&</b>", resumed: bool = False) -> Path:
    """An output folder as a run leaves it: config.json, events.jsonl, a sample image, a checkpoint."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(tiny_config(Path("data"), output, learning_rate=0.002)))
    image = output / "samples" / "step_6.png"
    image.parent.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    log = EventLog(output / "events.jsonl")
    starts = [0, 3] if resumed else [0]
    for index, loss in enumerate(LOSSES, start=1):
        if index - 1 in starts:
            log(Started(total_steps=6, num_images=6, device="cuda:0", mixed_precision="bf16", model_family="SD 1.x",
                        output_path=str(output), num_processes=2, gradient_checkpointing=True,
                        compile_unet="regional", cuda_graphs=True))
        log(Progress(step=index, total_steps=6, loss=loss, percent=100 * index / 6, lr=0.002, it_per_s=2.5,
                     eta_s=1.0, epoch=0))
        if index == 3:
            log(Checkpoint(step=3, path=str(output / "checkpoints" / "lora_step_3.safetensors")))
    log(Sample(step=6, image_path=str(image), prompt=prompt))
    log(Complete(final_path=str(output / "lora_final.safetensors"), total_time=12.5, step=6))
    log.close()
    return image


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(match) for match in re.findall(r"<svg.*?</svg>", page, flags=re.S)]


def polyline_points(svg: ET.Element, css_class: str = "raw") -> list[tuple[float, float]]:
    line = next(e for e in svg.iter("{http://www.w3.org/2000/svg}polyline") if e.get("class") == css_class)
    return [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]


def test_the_report_shows_the_loss_curve_the_settings_and_the_samples(tmp_path):
    image = record_run(tmp_path / "run")
    path = write_report(tmp_path / "run")
    assert path == tmp_path / "run" / REPORT_NAME  # beside lora_final.safetensors
    page = path.read_text(encoding="utf-8")

    loss_chart = svgs(page)[0]  # valid XML, one point per progress event
    points = polyline_points(loss_chart)
    assert len(points) == len(LOSSES)
    assert [x for x, _ in points] == sorted(x for x, _ in points)
    heights = [y for _, y in points]  # SVG y grows downwards: a higher loss is drawn higher up
    assert sorted(range(6), key=lambda i: heights[i]) == sorted(range(6), key=lambda i: -LOSSES[i])

    assert '<a href="lora_final.safetensors">' in page and 'href="checkpoints/lora_step_3.safetensors"' in page
    assert "<th>learning_rate</th><td>0.002</td>" in page and "<th>lora_rank</th><td>4</td>" in page
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == image.read_bytes()  # self-contained: the newest samples are inline
    assert "file://" not in page and 'href="samples/' not in page and 'src="samples/' not in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == page.count("<figure>")  # every sample inline
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # readable like any other output
    assert "shapestyle &lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>&</b>" not in page  # prompts are escaped
    assert "complete" in page and "cuda:0 × 2 process(es), precision bf16, gradient checkpointing" in page
    assert "gradient checkpointing, UNet compiled (regional, CUDA graphs)" in page


def test_a_resumed_run_is_one_curve_with_the_resume_marked(tmp_path):
    record_run(tmp_path / "run", resumed=True)
    page = write_report(tmp_path / "run").read_text(encoding="utf-8")
    loss_chart = svgs(page)[0]
    assert len(polyline_points(loss_chart)) == 6
    marks = [e for e in loss_chart.iter("{http://www.w3.org/2000/svg}line") if e.get("class") == "resume"]
    assert len(marks) == 1 and "<th>resumed</th><td>1 time(s)</td>" in page


def test_no_report_without_a_run(tmp_path):
    assert write_report(tmp_path) is None
    log = EventLog(tmp_path / "events.jsonl")
    log(Complete(final_path="x", total_time=1.0, step=1))  # a stray event but no `started`
    log.close()
    assert write_report(tmp_path) is None and not (tmp_path / REPORT_NAME).exists()


@pytest.mark.e2e
def test_tensorboard_is_off_by_default_and_a_missing_package_is_named(dataset_dir, tmp_path, monkeypatch):
    config = parse_config(tiny_config(dataset_dir, tmp_path / "out"))
    assert config.log_with == "none" and open_tracker(config) is None
    asked = config.model_copy(update={"log_with": "tensorboard"})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(TrackerUnavailable, match="pip install tensorboard"):
        open_tracker(asked)
    problems = plan_report(asked)["problems"]
    assert any(p["field"] == "log_with" and "tensorboard" in p["message"] for p in problems)
    terminal, _ = run_job_here(asked)
    assert terminal.type == "error" and terminal.field == "log_with" and "pip install tensorboard" in terminal.message


@pytest.mark.e2e
def test_a_run_logs_to_tensorboard_and_leaves_a_report_beside_the_lora(dataset_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    config = parse_config(tiny_config(dataset_dir, output, steps=4, checkpoint_steps=100, validation_steps=2,
                                      log_with="tensorboard"))
    terminal, history = run_job_here(config)
    assert terminal.type == "complete", terminal

    logs = EventAccumulator(str(output / "logs"), size_guidance={"images": 0, "scalars": 0})
    logs.Reload()
    progress = [e for e in history if e.type == "progress"]
    losses = logs.Scalars("train/loss")
    assert [s.step for s in losses] == [e.step for e in progress]
    assert [s.value for s in losses] == pytest.approx([e.loss for e in progress])
    assert [s.value for s in logs.Scalars("train/learning_rate")] == pytest.approx([e.lr for e in progress])
    images = logs.Images("samples/prompt_0")
    assert [i.step for i in images] == [e.step for e in history if e.type == "sample"] == [2, 4]

    report = output / REPORT_NAME
    assert report.is_file() and (output / "lora_final.safetensors").is_file()
    assert len(polyline_points(svgs(report.read_text(encoding="utf-8"))[0])) == 4


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_moved_report_keeps_every_image_and_names_files_outside_its_folder(tmp_path):
    image = record_run(tmp_path / "run")
    older = image.with_name("step_3.png")
    Image.new("RGB", (16, 16), (30, 200, 30)).save(older)
    log = EventLog(tmp_path / "run" / "events.jsonl")
    log(Sample(step=3, image_path=str(older), prompt="older"))  # an earlier round: embedded as well
    log.close()
    path = write_report(tmp_path / "run")
    moved = tmp_path / "elsewhere" / REPORT_NAME
    moved.parent.mkdir()
    path.rename(moved)
    page = moved.read_text(encoding="utf-8")
    assert page.count("<img") == 2 and all(src.startswith("data:image/png;base64,")
                                  for src in re.findall(r'<img src="([^"]+)"', page))
