"""The Runs tab's view of a run's scores (scores.json, lora_core/scores.py) and of two runs side by side: the
recommendation and warnings in words, the figures' curves by step, the table; the compared runs' sample
pictures in pairs and their scores. Its Score button (ScoresSection): one score job of a run at a time, followed
by the page that asked and by any page opened or reloaded while it waits or runs. Torch-free."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from lora_core import scores
from lora_core.errors import UserError
from lora_core.runrecord import RunFiles
from studio import runs
from studio.render import code
from studio.runs import RunDetail

if TYPE_CHECKING:
    from studio.jobs import Studio
    from studio.jobview import RunView

FOLLOW_TICK_S = 0.5
# each figure in the same colour in every run's plot (and the browser test finds each curve by it)
FIGURE_COLOURS = {"heldout_loss": "#2563eb", "concept": "#16a34a", "likeness": "#9333ea", "bleed": "#dc2626"}

NOT_SCORED = ("Not scored yet. **Score this run** measures every saved LoRA (held-out loss, concept strength, "
              "likeness, bleed) and recommends a checkpoint and strength; `score_at_end` does it when a run ends.")


def summary(detail: RunDetail) -> str:
    """The recommendation with its reason, the warnings (live ones and the scores'), the figures' meanings."""
    data = detail.scores
    live = [f"- ⚠ step {item['step']}: {item['message']}" for item in detail.overfitting]
    if data is None:
        return "\n".join([f"#### Scores of {code(detail.id)}", NOT_SCORED, *live])
    recommendation = data.get("recommendation") or {}
    lines = [f"#### Scores of {code(detail.id)}", f"**Recommended: {recommendation.get('text', '–')}**"]
    if recommendation.get("file"):
        lines.append(f"(file `{recommendation['file']}` at strength {recommendation.get('scale')})")
    lines += live + [f"- ⚠ {item['message']}" for item in data.get("warnings") or []
                     if item["reason"] != "heldout_rising" or not detail.overfitting]
    settings = data.get("settings") or {}
    lines.append(f"\nMeasured on {', '.join(repr(p) for p in settings.get('trigger_prompts', []))} (and without "
                 f"the trigger: {', '.join(repr(p) for p in settings.get('plain_prompts', []))}), seeds "
                 f"{settings.get('seeds')}, {settings.get('sampler_steps')} sampler steps at {settings.get('size')} px;"
                 f" the held-out loss on {settings.get('loss_images')} {settings.get('loss_on')} image(s).")
    lines += [f"- {text}" for text in scores.FIGURES.values()]
    return "\n".join(lines)


def figures_frame(data: dict[str, Any] | None):
    """(step, value, figure) rows of every figure's curve; None (an empty plot) when there are none: a plot
    given an empty frame drew no line at all for the frame given next (gradio 6), the next run's scores."""
    import pandas as pd

    rows = [(step, value, name) for name, points in scores.curves(data or {}).items() for step, value in points]
    if not rows:
        return None
    return pd.DataFrame({"step": pd.Series([row[0] for row in rows], dtype="int64"),
                         "value": pd.Series([row[1] for row in rows], dtype="float64"),
                         "figure": pd.Series([row[2] for row in rows], dtype=object)})


def table(data: dict[str, Any] | None) -> list[list[Any]]:
    return scores.table(data) if data else []


def side_by_side(result: dict[str, Any] | None) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    """The compared runs' pictures in rows (one per shared prompt, one picture per run or checkpoint, in the
    order picked) for a gallery with a column per run, and the table of their scores."""
    if not result:
        return [], []
    items = result["runs"]
    pictures = []
    for row in result.get("pictures", []):
        for item in items:
            cell = row["cells"][item]
            if Path(cell["path"]).is_file():
                pictures.append((cell["path"], f"{item}, step {cell['step']}, seed {cell['seed']}: {row['prompt']}"))
    names = ["LoRA", *scores.FIGURES, "recommended"]
    table_rows = [[name, *(_shown(result["scores"][item].get(name)) for item in items)] for name in names]
    return pictures, table_rows


def _shown(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def job_status(view: RunView, kind: str, run: str = "") -> str:
    """A grid's, sweep's or score's job state in words, with its cells (or LoRAs) done: #sheet-status under
    the grid, #score-status under the scores (naming the `run` it scores: another may be opened by then)."""
    words = {"queued": "waiting for the device", "starting": "loading the base model",
             "running": f"{'scoring LoRA' if kind == 'score' else 'drawing cell'} {view.step} of {view.total_steps}",
             "stopping": "stopping",
             "complete": "done", "stopped": "stopped", "failed": "failed", "idle": "unknown job"}
    word = "saving the image" if view.state == "stopping" and view.terminal is not None else words[view.state]
    text = f"{kind.capitalize()}{f' of {run}' if run else ''}: {word}"
    if view.message and view.state != "complete":
        text += f". {view.message}"
    where = "score-status" if kind == "score" else "sheet-status"
    return (f'<div class="ls-status ls-{view.state}" id="{where}" data-state="{view.state}">'
            f'<div class="ls-bar"><div class="ls-fill" style="width:{min(view.percent, 100):.2f}%"></div></div>'
            f'<div class="ls-line">{html.escape(text)}</div></div>')


class ScoresSection:
    """The opened run's scores and its Score button. A run is scored by one job at a time (a second would only
    redo it): Score is refused in words while one waits or runs."""

    def __init__(self, root: Path, studio: Studio | None):
        self.root, self.studio = Path(root), studio
        self._lock = threading.Lock()  # two clicks at once: one is queued, the other refused

    def form(self, run_id: str) -> tuple[Any, ...]:
        """The opened run's scores: the recommendation and warnings, the figures by step, the table."""
        try:
            detail = runs.run_detail(self.root, run_id)
        except UserError:
            return (gr.skip(),) * 3
        return (summary(detail), figures_frame(detail.scores),
                gr.Dataframe(value=table(detail.scores), headers=scores.TABLE_HEADERS))

    def opened(self, run_id: str) -> tuple[Any, ...]:
        """Opening a run: its scores, and no score job's status (a score of it still running says it again)."""
        return ("", *self.form(run_id))

    def score(self, run_id: str) -> dict[str, Any]:
        """Queue the scoring of a run's saved LoRAs (scores.json): {job_id, state, position, output_path, run_id}."""
        from studio.jobs import BusyError

        if self.studio is None:
            raise gr.Error("this page cannot score runs (no job registry)")
        with self._lock:
            try:
                folder = runs.resolve_run(self.root, run_id)
                if (busy := self.scoring(folder)) is not None:
                    raise BusyError(f"run {run_id!r} is being scored now (job {busy['job_id']}); its scores show "
                                    "here when that ends")
                submitted = self.studio.submit_tool("score", folder, [])
            except (UserError, BusyError, ValueError) as error:
                raise gr.Error(f"No score queued: {error}") from None
        return {**submitted.to_dict(), "run_id": folder.name}

    def scoring(self, folder: Path | None = None) -> dict[str, str] | None:
        """{job_id, run_id} of a score waiting or running now (of the run in `folder`, if given): what a page
        opened or reloaded while it scores follows."""
        if self.studio is None:
            return None
        jobs = [(job["job_id"], job.get("target")) for job in self.studio.queued() if job.get("kind") == "score"]
        for job_id in self.studio.running():  # after queued(): a job leaves the queue as it starts
            if "-score-" in job_id:  # a running one's job.json names its run (adopted after a restart too)
                jobs.append((job_id, RunFiles(Path(self.studio.view(job_id).output_path)).job_record().get("target")))
        for job_id, target in jobs:
            if target and (folder is None or Path(str(target)).resolve() == Path(folder).resolve()):
                return {"job_id": job_id, "run_id": Path(str(target)).name}
        return None

    def follow(self, submitted: dict[str, Any] | None, opened: str | None) -> Iterator[tuple[Any, ...]]:
        """The score job's progress, then the run's scores, unless the page has opened another run since."""
        if not submitted or self.studio is None:
            return
        run_id = str(submitted.get("run_id", ""))
        while True:
            view = self.studio.view(submitted["job_id"])
            if not (view.active or view.state == "queued"):
                break
            yield job_status(view, "score", run_id), gr.skip(), gr.skip(), gr.skip()
            time.sleep(FOLLOW_TICK_S)
        shown = self.form(run_id) if opened in (None, "", run_id) else (gr.skip(),) * 3
        yield job_status(view, "score", run_id), *shown

    def build(self) -> None:
        with gr.Group(elem_id="run-scores"):
            self.summary = gr.Markdown(elem_id="scores-summary")
            self.plot = gr.LinePlot(x="step", y="value", color="figure", title="Scores by step (strength 1)",
                                    height=240, elem_id="scores-plot", color_map=FIGURE_COLOURS)
            self.table = gr.Dataframe(headers=scores.TABLE_HEADERS, interactive=False, elem_id="scores-table")
            self.button = gr.Button("Score this run", elem_id="score-run")
            self.job = gr.JSON(visible=False)
            self.state = gr.HTML(elem_id="score-progress")

    def wire(self, demo: gr.Blocks, pick: gr.components.Component) -> list[gr.components.Component]:
        """Score and its follower; a page loaded while a score waits or runs follows it too. Answers what
        opening a run fills (`opened`)."""
        shown = [self.summary, self.plot, self.table]
        follow = dict(api_name=False, concurrency_id="follow", concurrency_limit=None, show_progress="hidden")
        self.button.click(self.score, pick, self.job, api_name="score", concurrency_id="control",
                          concurrency_limit=None).success(self.follow, [self.job, pick], [self.state, *shown],
                                                          **follow)
        demo.load(self.scoring, None, self.job, api_name=False, concurrency_id="poll", concurrency_limit=None).then(
            self.follow, [self.job, pick], [self.state, *shown], **follow)
        return [self.state, *shown]
