"""`training_report.html`: one file to look at a run without the web page, built from events.jsonl.

The events are the source of truth, folded by `runrecord.RunRecord` (the record the page reads too): the loss
and learning-rate curves come from `progress` events (and the held-out images' loss, drawn on the loss chart,
from `validation` events), the samples from `sample` events, the outcome from the terminal event; the settings
come from the config.json the run wrote. The page is self-contained (inline SVG charts, inline CSS, the sample
images embedded as base64, newest first up to EMBED_LIMIT bytes; older ones beyond that are named, never
linked), so a report that is moved or mailed keeps its images; the LoRA files are named by their path relative
to the output folder. A resumed run appends to events.jsonl: each resume is marked on the charts at the step
it continued from.

    python -m lora_core report OUTPUT_FOLDER   (re)writes OUTPUT_FOLDER/training_report.html
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_core.eventlog import read_events
from lora_core.files import atomic_write_text
from lora_core.runrecord import REPORT_FILE, RunFiles, RunRecord, SampleImage, read_json

log = logging.getLogger("lora_core.report")

REPORT_NAME = REPORT_FILE
EMBED_LIMIT = 4 * 1024**2  # bytes of sample images embedded in the page; beyond that they are only linked


def write_report(output: str | Path) -> Path | None:
    """Write `training_report.html` in `output` from its events.jsonl; None when no run started there."""
    output = Path(output)
    files = RunFiles(output)
    if not files.events.is_file():
        return None
    record = RunRecord().add_all(read_events(files.events))
    if not record.starts:
        return None
    config = read_json(files.config)
    return atomic_write_text(files.report, render(record, config if isinstance(config, dict) else {}, output))


def write_report_safely(output: str | Path) -> Path | None:
    """`write_report`, logging instead of raising: a report must never change a run's outcome."""
    try:
        return write_report(output)
    except Exception as error:
        log.warning("could not write %s in %s: %s", REPORT_NAME, output, error)
        return None


# ----------------------------------------------------------------------------------------------------
# the page


def render(record: RunRecord, config: dict[str, Any], output: Path) -> str:
    assert record.start is not None
    title = f"LoRA training report: {Path(record.start.output_path).name or record.start.output_path}"
    losses, rates = _finite(record.loss_points), _finite(record.lr_points)
    sections = [
        f"<h1>{_e(title)}</h1>",
        _outcome(record, output),
        "<h2>Loss</h2>",
        svg_chart(losses, "loss", marks=record.resumed_at,
                  second=("validation loss (held-out images)", _finite(record.validation_points)))
        if losses else "<p>No progress was recorded.</p>",
        "<h2>Learning rate</h2>",
        svg_chart(rates, "learning rate", marks=record.resumed_at, height=160) if rates else "",
        _scores(record, output),
        "<h2>Samples</h2>",
        _samples(record, output),
        "<h2>Checkpoints</h2>",
        _checkpoints(record, output),
        _doctor(record),
        _concepts(record),
        "<h2>Settings</h2>",
        _config_table(config),
    ]
    return PAGE.format(title=_e(title), body="\n".join(part for part in sections if part))


def _scores(record: RunRecord, output: Path) -> str:
    """The overfitting warnings (`overfitting` events and scores.json's), the recommended checkpoint and
    strength, and each figure by step with the table (scores.py)."""
    from lora_core import scores

    data = scores.read_scores(output)
    notes = [f"step {item['step']}: {item['message']}" for item in record.overfitting]
    notes += [item["message"] for item in (data or {}).get("warnings") or []
              if item["reason"] != "heldout_rising" or not record.overfitting]
    warned = "".join(f'<p class="warn">⚠ {_e(note)}</p>' for note in notes)
    if data is None:
        return f"<h2>Warnings</h2>{warned}" if warned else ""
    charts = "".join(f"<h3>{_e(scores.FIGURES[name].split(':')[0])}</h3>" + svg_chart(points, name, height=160)
                     for name, points in scores.curves(data).items() if points)
    head = "".join(f"<th>{_e(name)}</th>" for name in scores.TABLE_HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{'' if v is None else _e(v)}</td>" for v in row) + "</tr>"
                   for row in scores.table(data))
    meanings = "".join(f"<li>{_e(text)}</li>" for text in scores.FIGURES.values())
    return (f"<h2>Scores</h2><p><strong>Recommended: {_e((data.get('recommendation') or {}).get('text', '–'))}"
            f"</strong></p>{warned}{charts}<table><tr>{head}</tr>{body}</table><ul>{meanings}</ul>")


def _doctor(record: RunRecord) -> str:
    """The dataset doctor's findings from the latest `dataset` event (lora_core/doctor.py)."""
    findings = record.findings
    if not findings:
        return ""
    rows = "".join(f"<tr><td>{_e(f.get('severity'))}</td><td>{_e(f.get('kind'))}</td>"
                   f"<td>{_e(', '.join(f.get('files', [])[:8]))}</td><td>{_e(f.get('message'))}<br><small>"
                   f"{_e(f.get('why'))}</small></td><td>{_e(f.get('fix'))}</td></tr>" for f in findings)
    return (f"<h2>Dataset doctor</h2><p>{len(findings)} finding(s) about the dataset when training started "
            "(<code>python -m lora_core doctor</code> checks it again).</p><table><tr><th>severity</th>"
            f"<th>kind</th><th>files</th><th>what and why</th><th>fix</th></tr>{rows}</table>")


def _concepts(record: RunRecord) -> str:
    """Per concept counts (the `dataset` event) and, with several concepts, the bleed table (lora_core/bleed.py)."""
    if len(record.concepts) < 2:
        return ""
    rows = "".join(f"<tr><td>{_e(c.get('name'))}{' (regularisation)' if c.get('regularization') else ''}</td>"
                   f"<td>{_e(', '.join(c.get('trigger_words') or []))}</td><td>{_e(c.get('num_images'))}</td>"
                   f"<td>{_e(c.get('repeats') or 'balanced')}</td><td>{_e(c.get('entries_per_epoch'))}</td>"
                   f"<td>{_e(c.get('resolution'))}</td></tr>" for c in record.concepts)
    text = ("<h2>Concepts</h2><table><tr><th>concept</th><th>trigger words</th><th>images</th><th>repeats</th>"
            f"<th>per epoch</th><th>resolution</th></tr>{rows}</table>")
    if record.bleed:
        cells = "".join(f"<tr><td>{_e(', '.join(b.get('trigger_words') or []))} ({_e(b.get('from_concept'))})</td>"
                        f"<td>{_e(b.get('concept'))}</td><td>{_bleed_text(b.get('bleed'))}</td></tr>"
                        for b in record.bleed)
        text += ("<h3>Bleed</h3><p>How far one concept's trigger words draw another concept's images, from the "
                 "denoising loss at the end: 0 % none, 100 % as much as that concept's own trigger words.</p>"
                 f"<table><tr><th>trigger words</th><th>draw concept</th><th>bleed</th></tr>{cells}</table>")
    return text


def _bleed_text(value: Any) -> str:
    """A share; below 0 (the words draw something further from the concept than a made-up word) shows as 0 %."""
    return "–" if value is None else f"{100 * max(0.0, value):.0f} %"


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, value) for step, value in points if value is not None and math.isfinite(value)]


def _outcome(record: RunRecord, output: Path) -> str:
    start, terminal = record.start, record.terminal
    rows: list[tuple[str, str]] = []
    if terminal is None:
        rows.append(("status", "running (or stopped without a final event)"))
    elif terminal.type == "complete":
        rows += [("status", "complete"), ("LoRA", _link(terminal.final_path, output)),
                 ("time", f"{terminal.total_time:.1f} s")]
    elif terminal.type == "interrupted":
        rows += [("status", f"stopped at step {terminal.step}: {_e(terminal.message)}")]
        if terminal.checkpoint_path:
            rows.append(("saved", _link(terminal.checkpoint_path, output)))
    else:
        rows.append(("status", f"failed: {_e(terminal.message)}"))
    held_out = record.validation_points
    rows += [
        ("steps", f"{record.step} of {start.total_steps}"),
        ("final loss", f"{record.loss:.5g}" if record.loss is not None else "–"),
        *([("validation loss", f"{held_out[0][1]:.5g} at step {held_out[0][0]} → "
                               f"{held_out[-1][1]:.5g} at step {held_out[-1][0]}")] if held_out else []),
        ("speed", f"{record.it_per_s:.3g} steps/s" if record.it_per_s else "–"),
        ("images", str(start.num_images)),
        ("model", _e(start.model_family)),
        ("device", f"{_e(start.device)} × {start.num_processes} process(es), precision "
                   f"{_e(start.mixed_precision)}"
                   f"{', gradient checkpointing' if start.gradient_checkpointing else ''}"
                   f"{_compiled(start)}"),
        ("started", _e(record.started_at)),
    ]
    if record.starts > 1:
        rows.append(("resumed", f"{record.starts - 1} time(s)"))
    return _table(rows, css_class="outcome")


def _samples(record: RunRecord, output: Path) -> str:
    if not record.samples:
        return "<p>No sample images were made.</p>"
    by_step: dict[int, list[SampleImage]] = {}
    for sample in record.samples:
        by_step.setdefault(sample.step, []).append(sample)
    budget = EMBED_LIMIT
    rows = []
    for step in sorted(by_step, reverse=True):  # newest first, embedded while they fit in the budget
        cells = []
        for sample in by_step[step]:
            path = Path(sample.path)
            size = path.stat().st_size if path.is_file() else None
            if size is not None and size <= budget:
                budget -= size
                source = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
                picture = f'<img src="{_e(source)}" alt="{_e(sample.prompt)}">'
            else:
                why = "missing" if size is None else "not embedded: the report's image budget is spent"
                picture = f'<p class="absent">{_e(_relative(path, output))} ({why})</p>'
            cells.append(f'<figure>{picture}<figcaption>{_e(sample.prompt)}</figcaption></figure>')
        rows.append(f'<div class="samples"><h3>step {step}</h3>{"".join(cells)}</div>')
    return "\n".join(rows)


def _checkpoints(record: RunRecord, output: Path) -> str:
    if not record.checkpoints:
        return "<p>No intermediate checkpoints.</p>"
    return _table([(f"step {saved.step}", _link(saved.path, output)) for saved in record.checkpoints])


def _config_table(config: dict[str, Any]) -> str:
    if not config:
        return "<p>config.json was not found.</p>"
    flat = {key: value for key, value in config.items() if key != "training_params"}
    flat.update(config.get("training_params", {}))
    return _table([(_e(key), _e(json.dumps(value))) for key, value in flat.items()], css_class="config")


# ----------------------------------------------------------------------------------------------------
# the chart


def svg_chart(points: list[tuple[float, float]], label: str, marks: Sequence[int] = (), width: int = 720,
              height: int = 260, second: tuple[str, list[tuple[float, float]]] | None = None) -> str:
    """A line chart of (step, value) as inline SVG: axes with ticks, the raw values and, when there are
    enough of them, a smoothed line (exponential moving average) over them; `second` (label, points) is
    another series on the same axes, drawn with its points marked and a legend."""
    left, right, top, bottom = 64, 16, 12, 36
    others = second[1] if second else []
    xs, ys = [x for x, _ in points + others], [y for _, y in points + others]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        pad = abs(y_high) * 0.1 or 1.0
        y_low, y_high = y_low - pad, y_high + pad

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y_high - y) / (y_high - y_low) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{_e(label)} by step">']
    for tick in _ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" '
                     f'class="grid"/><text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.4g}</text>')
    for tick in _ticks(x_low, x_high):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick:.6g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    for mark in marks:
        parts.append(f'<line x1="{sx(mark):.1f}" x2="{sx(mark):.1f}" y1="{top}" y2="{height - bottom}" '
                     f'class="resume"><title>resumed at step {mark}</title></line>')
    raw = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts.append(f'<polyline points="{raw}" class="raw"><title>{_e(label)}</title></polyline>')
    if len(points) >= 10:
        smooth, average = [], ys[0]
        for x, y in points:
            average = 0.9 * average + 0.1 * y
            smooth.append(f"{sx(x):.1f},{sy(average):.1f}")
        parts.append(f'<polyline points="{" ".join(smooth)}" class="smooth"><title>{_e(label)}, smoothed'
                     f'</title></polyline>')
    if others:
        parts.append(_second_series(second[0], [(sx(x), sy(y)) for x, y in others], width - right, top))
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" class="axis"/>'
                 f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" '
                 f'class="axis"/></svg>')
    return "".join(parts)


def _second_series(label: str, points: list[tuple[float, float]], right: float, top: float) -> str:
    """The second series in chart coordinates: a line through dots, and its legend at the top right."""
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" class="second-dot"/>' for x, y in points)
    return (f'<polyline points="{line}" class="second"><title>{_e(label)}</title></polyline>{dots}'
            f'<text x="{right - 4}" y="{top + 12}" text-anchor="end" class="legend">'
            f'<tspan class="first-key">━</tspan> training loss <tspan class="second-key">━</tspan> {_e(label)}</text>')


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k apart) covering [low, high]."""
    span = high - low
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step) + 1)]


# ----------------------------------------------------------------------------------------------------
# small helpers


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _relative(path: str | Path, output: Path) -> str:
    """`path` as a link from the report beside the output folder's files (absolute if it lies elsewhere)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), output.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()


def _link(path: str, output: Path) -> str:
    """A link to a file beside the report (it travels with the folder); a file elsewhere is only named, so
    the page never points at a path on this machine."""
    target = _relative(path, output)
    if target.startswith("../") or Path(target).is_absolute():
        return f"<code>{_e(Path(path).as_posix())}</code>"
    return f'<a href="{_e(target)}">{_e(target)}</a>'


def _table(rows: list[tuple[str, str]], css_class: str = "") -> str:
    body = "".join(f"<tr><th>{key}</th><td>{value}</td></tr>" for key, value in rows)
    return f'<table class="{css_class}">{body}</table>'


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; }}
th, td {{ text-align: left; padding: 0.25rem 0.75rem; border-bottom: 1px solid #ddd; vertical-align: top; }}
th {{ font-weight: 600; white-space: nowrap; }}
table.config td {{ font-family: ui-monospace, monospace; }}
svg {{ max-width: 100%; height: auto; font-size: 11px; fill: #444; }}
svg .grid {{ stroke: #eee; }} svg .axis {{ stroke: #888; }}
svg .raw {{ fill: none; stroke: #9ab8e8; stroke-width: 1.2; }}
svg .smooth {{ fill: none; stroke: #1f5fbf; stroke-width: 2; }}
svg .resume {{ stroke: #d9822b; stroke-dasharray: 4 3; }}
svg .second {{ fill: none; stroke: #c0392b; stroke-width: 2; }} svg .second-dot {{ fill: #c0392b; }}
svg .second-key {{ fill: #c0392b; }} svg .first-key {{ fill: #1f5fbf; }}
.samples {{ display: flex; flex-wrap: wrap; gap: 0.75rem; align-items: flex-start; }}
.samples h3 {{ width: 100%; margin: 0.5rem 0 0; font-size: 1rem; }}
figure {{ margin: 0; max-width: 256px; }} figure img {{ width: 100%; image-rendering: auto; }}
figcaption {{ font-size: 0.85rem; color: #555; }}
.absent {{ font-size: 0.8rem; color: #888; }} .warn {{ color: #a04000; font-weight: 600; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _compiled(start) -> str:
    """', UNet compiled (regional, CUDA graphs)' as the started event says, or nothing."""
    scope = getattr(start, "compile_unet", "off")
    if scope == "off":
        return ""
    return f", UNet compiled ({_e(scope)}{', CUDA graphs' if getattr(start, 'cuda_graphs', False) else ''})"
