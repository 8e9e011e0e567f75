"""The Runs tab's view of a run's scores (scores.json, lora_core/scores.py) and of two runs side by side: the
recommendation and warnings in words, the figures' curves by step, the table; the compared runs' sample
pictures in pairs and their scores. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_core import scores
from studio.runs import RunDetail

NOT_SCORED = ("Not scored yet. **Score this run** measures every saved LoRA (held-out loss, concept strength, "
              "likeness, bleed) and recommends a checkpoint and strength; `score_at_end` does it when a run ends.")


def summary(detail: RunDetail) -> str:
    """The recommendation with its reason, the warnings (live ones and the scores'), the figures' meanings."""
    data = detail.scores
    live = [f"- ⚠ step {item['step']}: {item['message']}" for item in detail.overfitting]
    if data is None:
        return "\n".join(["#### Scores", NOT_SCORED, *live])
    recommendation = data.get("recommendation") or {}
    lines = ["#### Scores", f"**Recommended: {recommendation.get('text', '–')}**"]
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
    """(step, value, figure) rows of every figure's curve, typed even when empty (see render.plot_frame)."""
    import pandas as pd

    rows = [(step, value, name) for name, points in scores.curves(data or {}).items() for step, value in points]
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
