"""What the page shows, as HTML, Markdown and plot frames: pure functions of a run's view or a report.

No Gradio here: the tabs (studio/train_tab.py, studio/runs_page.py) put these into their components, and
the tests read them without a server.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core.runrecord import FAILED, STOPPING

if TYPE_CHECKING:
    from studio.jobs import RunView

CSS = """
.ls-status {padding: 10px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);}
.ls-bar {height: 14px; border-radius: 7px; background: var(--background-fill-secondary); overflow: hidden;}
.ls-fill {height: 100%; background: var(--color-accent); transition: width .4s;}
.ls-complete .ls-fill {background: #16a34a;} .ls-failed .ls-fill, .ls-stopped .ls-fill {background: #d97706;}
.ls-line {margin-top: 6px; font-variant-numeric: tabular-nums;}
.ls-message {margin-top: 6px; white-space: pre-wrap;} .ls-failed .ls-message {color: #b91c1c;}
#start-note {color: #b91c1c;}
/* small samples (the toy model draws 64 px) are enlarged with hard pixel edges, never stretched to a blur */
.ls-pixels img {image-rendering: pixelated;}
#sheet-image img {image-rendering: pixelated; max-width: 100%; width: auto; object-fit: contain;}
"""

STATE_WORDS = {"idle": "No training yet", "queued": "Queued: waiting for the device",
               "starting": "Starting: loading the model and caching the dataset",
               "running": "Training", "stopping": "Stopping after this step (a checkpoint is saved)",
               "complete": "Done", "stopped": "Stopped", "failed": "Failed"}
FINISHING = "Finishing: writing the report and releasing the device"  # stopping, once the final event is written
ENDED_WORDS = {"complete": "finished", "stopped": "was stopped", "failed": "failed"}


def code(text: str) -> str:
    """Inline code for a name a client chose (a backtick in it would end the code span)."""
    return "`" + str(text).replace("`", "'") + "`"


def plural(count: int, noun: str) -> str:
    """ "1 image", "2 images" """
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration(seconds: float) -> str:
    if seconds < 0:
        return "…"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def dataset_markdown(scan_report, upload_report=None) -> str:
    """The dataset scan in words: images, captions, sizes, and every refused or ignored file with its reason."""
    lines = [f"**{plural(len(scan_report.images), 'image')}**, {scan_report.captioned} with a caption file, in "
             f"{code(scan_report.folder)}"]
    sizes = sorted({f"{r.width}×{r.height}" for r in scan_report.images})
    lines.append(f"Sizes: {', '.join(sizes[:8])}{' …' if len(sizes) > 8 else ''}")
    refused = list(upload_report.refused if upload_report else []) + scan_report.refused
    if refused:
        lines.append(f"**Refused ({len(refused)}):**")
        lines += [f"- {code(item['file'])}: {item['reason']}" for item in refused]
    if upload_report and upload_report.notes:
        lines += [f"- {note}" for note in upload_report.notes]
    if scan_report.ignored:
        lines.append(f"Ignored (not images): {', '.join(code(name) for name in scan_report.ignored[:20])}")
    return "\n\n".join(lines)


def step_speed(it_per_s: float) -> str:
    """Training speed as people read it: steps per second when fast, seconds per step when slow."""
    if it_per_s <= 0:
        return "… s/step"
    return f"{it_per_s:.2f} it/s" if it_per_s >= 1 else f"{1 / it_per_s:.1f} s/step"


def load_note(load: float | None = None, cores: int | None = None) -> str:
    """A busy machine, in words ("" when it is not): a load average above the core count slows every step."""
    import os

    import psutil

    load = psutil.getloadavg()[0] if load is None else load
    cores = cores or os.cpu_count() or 1
    if load <= cores:
        return ""
    return (f"The machine is busy (load {load:.1f} on {cores} core{'s' if cores != 1 else ''}): other work "
            "shares it, so steps take longer than on an idle machine.")


def status_html(view: RunView, earlier: bool = False, kept: RunView | None = None) -> str:
    """The run's state, progress and message. `earlier`: an ended run this page has moved on from (it has
    another dataset now): shown as the last run, not as the current state. `kept`: the last run that
    finished, named after a failure so that its result stays in reach."""
    if earlier and view.ended:
        where = ("the Runs tab has its details" if Path(view.output_path).is_dir() else
                 "it ended before training began and left no run folder, so the Runs tab does not list it")
        note = f"Ready to start. The last run, {Path(view.output_path).name}, {ENDED_WORDS[view.state]}; {where}."
        return (f'<div class="ls-status ls-idle" id="run-status" data-state="idle" data-percent="0" '
                f'data-step="0"><div class="ls-line">{html.escape(note)}</div></div>')
    parts = [FINISHING if view.state == STOPPING and view.terminal is not None else STATE_WORDS[view.state]]
    if view.total_steps:
        parts.append(f"step {view.step} / {view.total_steps}")
        parts.append(f"{view.percent:g} %")
    if view.loss is not None:
        parts.append(f"loss {view.loss:.4f}")
    if view.state == "running":
        parts += [step_speed(view.it_per_s), f"ETA {duration(view.eta_s)}"]
    if view.device:
        parts.append(f"{view.model_family} on {view.device}")
    if view.resumed_at:
        parts.append("resumed at step " + ", ".join(map(str, view.resumed_at)))
    message = view.message
    if view.state == FAILED and view.error_field:
        message = f"Problem with {view.error_field}: {message}"
    if view.output_path and view.state != "idle":
        message = (message + "\n" if message else "") + f"Output folder: {view.output_path}"
    if view.state == "running" and (busy := load_note()):
        message = (message + "\n" if message else "") + busy
    if kept is not None:
        message += (f"\nThe last finished run, {Path(kept.output_path).name}, is unchanged: its LoRA downloads "
                    "below, and the Runs tab has the rest.")
    warning = "".join(f'<div class="ls-warning" data-reason="{html.escape(item["reason"])}">⚠ '
                      f'{html.escape(item["message"])}</div>' for item in view.overfitting)
    return (f'<div class="ls-status ls-{view.state}" id="run-status" data-state="{view.state}" '
            f'data-percent="{view.percent:g}" data-step="{view.step}">'
            f'<div class="ls-bar"><div class="ls-fill" style="width:{min(view.percent, 100):.2f}%"></div></div>'
            f'<div class="ls-line">{html.escape(" · ".join(parts))}</div>'
            f'<div class="ls-message">{html.escape(message)}</div>{warning}</div>')


def plot_frame(rows: list[tuple[int, float, str]]):
    """(step, loss, line) rows as the loss plots' frame, typed even when empty: gr.LinePlot reads an untyped
    (object) column as categories, and a plot first drawn from an empty frame kept category axes with a tick
    per step after the points came."""
    import pandas as pd

    return pd.DataFrame({"step": pd.Series([row[0] for row in rows], dtype="int64"),
                         "loss": pd.Series([row[1] for row in rows], dtype="float64"),
                         "line": pd.Series([row[2] for row in rows], dtype=object)})


def loss_frame(view: RunView):
    """The live plot's training loss. The held-out loss is the opened run's second curve (Runs tab), the
    report's and TensorBoard's: with a colour per series, gradio's live plot (first drawn empty, then updated
    by the timer) drew no line at all."""
    return plot_frame([(step, loss, "training") for step, loss in view.curve()])


def run_summary(view: RunView) -> dict[str, Any]:
    """One job's run as the `run` endpoint answers it."""
    return {"job_id": view.job_id, "state": view.state, "step": view.step, "total_steps": view.total_steps,
            "percent": view.percent, "loss": view.loss, "output_path": view.output_path,
            "final_path": view.final_path, "checkpoints": [saved.path for saved in view.checkpoints],
            "samples": [sample.path for sample in view.samples], "message": view.message,
            "error_field": view.error_field, "stderr_tail": view.stderr_tail, "resumed_at": view.resumed_at,
            "saved_so_far": view.saved_so_far}


QUEUE_HEADERS = ["#", "run", "job", "model", "steps", "queued at"]


def queued_run_name(job: dict[str, Any]) -> str:
    """The run a queued job is for: a training job's own folder, a grid's, sweep's or score's run (its target;
    its job folder is OUTPUTS/.studio/jobs/ID)."""
    return Path(job.get("target") or job["output_path"]).name


def queue_label(job: dict[str, Any]) -> str:
    """One queued job in words, for the queue picker: its place, run, kind, model and steps."""
    kind = "resume" if job.get("resume") else job.get("kind", "train")
    parts = [f"{job['position']}. {queued_run_name(job)}", kind, job.get("base_model") or "",
             plural(job['steps'], 'step') if job.get('steps') else ""]
    return " · ".join(part for part in parts if part)


def queue_rows(queued: list[dict[str, Any]]) -> list[list[Any]]:
    """The queue as the page's table shows it (QUEUE_HEADERS)."""
    return [[job["position"], queued_run_name(job), "resume" if job["resume"] else job.get("kind", "train"),
             job.get("base_model") or "", job.get("steps") or "", job["queued_at"][11:19]] for job in queued]


def quantized(estimate: dict[str, Any]) -> str:
    storage, blocks = estimate.get("base_quantization", "none"), estimate.get("offload_blocks", 0)
    return ("" if storage == "none" else f", base stored in {storage}") + (
        f", {blocks} block{'s' if blocks != 1 else ''} offloaded to the CPU" if blocks else "")


def estimate_markdown(report: dict[str, Any]) -> str:
    """`--validate-only`'s report in words: the device, the memory estimate, and what will not fit."""
    lines = []
    if device := report.get("device"):
        memory = f", {device['free_memory_gib']} GiB free of {device['total_memory_gib']} GiB" \
            if device.get("total_memory_gib") else ""
        lines.append(f"**Device:** {device['name']} ({device['kind']}{memory}), precision "
                     f"{device['mixed_precision']}")
    if devices := report.get("devices"):
        lines.append(f"**Devices:** {devices['processes']} training process(es), {devices['available']} device(s) "
                     f"visible, global batch {devices['global_batch_size']}")
    if estimate := report.get("memory_estimate"):
        lines.append(f"**Memory estimate:** about {estimate['total_gib']} GiB (weights "
                     f"{estimate['frozen_weights_gib']}, LoRA + optimizer {estimate['lora_and_optimizer_gib']}, "
                     f"activations {estimate['activations_gib']}"
                     f"{', gradient checkpointing on' if estimate.get('gradient_checkpointing') else ''}"
                     f"{quantized(estimate)}); {estimate['covers']}")
    if report.get("memory_mode"):  # memory_mode auto: what it chose for this card
        lines.append(f"**Memory mode auto:** {report['memory_mode']['summary']}")
    if "total_steps" in report:
        lines.append(f"**Steps:** {report['total_steps']} on {plural(report['dataset']['num_images'], 'image')}")
    if "model" in report:
        lines.append(f"**Model:** {report['model']['family']}")
    lines += [f"**Will not fit:** {warning}" for warning in report.get("warnings", [])]
    lines += [f"**Problem, {item['field']}:** {item['message']}" for item in report.get("problems", [])]
    if report.get("ok") and not report.get("warnings"):
        lines.append("**Ready to train.**")
    return "\n\n".join(lines)
