"""A run's scores (scores.json, written by scoring.py): what each figure means, the recommended checkpoint and
strength with the reason in words, and the warnings. Torch-free: the page and the report read it.

The figures of one LoRA file (at strength 1, or at a `scale` in `strengths`), each over fixed prompts and
seeds, z being the final latents of a drawing (the base model's VAE space, scaled as the denoiser sees them),
φ(z) each latent channel's mean and standard deviation over the picture (scoring.describe) and
rms(a) = sqrt(mean(a²)):

    heldout_loss  mean over held-out images i and fixed draws k of the training objective's loss
                  L(LoRA; x_i, noise_ik, level_k) (validation.py's draws: the same for every checkpoint)
    concept       mean over trigger prompts p and seeds s of rms(φ(z_LoRA(p, s)) - φ(z_base(p, s)))
    likeness      mean over p, s of 1 - d(z_LoRA(p, s)) / d(z_base(p, s)), d(z) = min over training pictures t
                  of rms(φ(z) - φ(z_t)): 0 no nearer the training pictures than the base model, 1 on one of them
    bleed         mean over prompts q without the trigger and seeds s of rms(φ(z_LoRA(q, s)) - φ(z_base(q, s)))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_core.heldout_watch import RISE
from lora_core.runrecord import read_json

SCORES_FILE = "scores.json"
PATIENCE = 3  # the last LoRAs whose held-out loss must all have risen: overfit_patience's default
TIE = 0.01  # held-out losses within 1 % of the lowest are a tie, decided by concept over bleed
LIKENESS_TIE = 0.02  # likeness within this of the highest is as near: the stronger strength is taken
FIGURES: dict[str, str] = {
    "heldout_loss": "held-out loss: how well the LoRA denoises the held-out pictures at fixed noise levels and "
                    "noise (lower is better); mean of the training loss L over images and draws",
    "concept": "concept strength: how far the trigger prompts' results move from the base model's at the same "
               "seeds; mean of rms(φ(z_LoRA) − φ(z_base)) over trigger prompts and seeds (φ: each latent channel's "
               "mean and spread)",
    "likeness": "likeness: how much nearer the trigger prompts' results come to the nearest training picture "
                "than the base model's (1 = on a training picture, 0 = no nearer); mean of 1 − d(z_LoRA)/d(z_base)",
    "bleed": "bleed: how far prompts without the trigger move from the base model's results at the same seeds "
             "(lower is better); mean of rms(φ(z_LoRA) − φ(z_base)) over those prompts and seeds",
}


def read_scores(folder: str | Path) -> dict[str, Any] | None:
    data = read_json(Path(folder) / SCORES_FILE)
    return data if isinstance(data, dict) and isinstance(data.get("loras"), list) else None


def _loss(lora: dict[str, Any]) -> float | None:
    value = lora.get("heldout_loss")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _margin(entry: dict[str, Any]) -> float:
    return float(entry.get("concept") or 0.0) - float(entry.get("bleed") or 0.0)


def rank(loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scored LoRAs best first: the lowest held-out loss (ties within TIE broken by concept minus bleed);
    without held-out losses, the most concept over bleed."""
    losses = [value for lora in loras if (value := _loss(lora)) is not None]
    if not losses:
        return sorted(loras, key=_margin, reverse=True)
    low = min(losses)

    def key(lora: dict[str, Any]) -> tuple[int, float]:
        value = _loss(lora)
        if value is None:
            return (2, 0.0)
        return (0, -_margin(lora)) if value <= low * (1 + TIE) else (1, value)

    return sorted(loras, key=key)


def _label(lora: dict[str, Any]) -> str:
    return f"step {lora['step']:,}" if lora.get("step") is not None else str(lora.get("label"))


def _checkpoint_reason(loras: list[dict[str, Any]], chosen: dict[str, Any]) -> str:
    measured = [lora for lora in loras if _loss(lora) is not None]
    if not measured:
        return "no held-out loss was measured, so the most concept over bleed decides"
    lowest = min(measured, key=lambda lora: _loss(lora))
    if lowest is measured[-1]:
        reason = "the held-out loss was still falling at the end"
    else:
        reason = f"the held-out loss stopped falling at {_label(lowest)}"
    if chosen is not lowest:
        reason += f" ({_label(chosen)} is within {TIE:.0%} of it with more concept over bleed)"
    return reason


def _strength(data: dict[str, Any], chosen: dict[str, Any]) -> tuple[float, str]:
    """The scored strength whose trigger results come nearest the training pictures (the highest likeness; the
    strongest of those within LIKENESS_TIE of it). A LoRA pushed past its pictures (overcooked: at 1 it
    overshoots the colours and shapes it learnt) comes back to them at a lower strength; a sound one is nearest
    at or near 1. Without likeness figures: the largest strength up to which each step adds more concept than
    bleed."""
    rows = sorted([row for row in data.get("strengths", []) if row.get("label") == chosen.get("label")]
                  + [{**chosen, "scale": 1.0}], key=lambda row: row["scale"])
    if all(_finite(row.get("likeness")) for row in rows):
        best = max(row["likeness"] for row in rows)
        pick = max((row for row in rows if row["likeness"] >= best - LIKENESS_TIE), key=lambda row: row["scale"])
        nearest = max(rows, key=lambda row: row["likeness"])
        tie = "" if nearest is pick else f", as near as {nearest['likeness']:.2f} at {nearest['scale']:g}"
        if pick["scale"] == 1.0:
            reason = f"its trigger prompts' results come nearest the training pictures at full strength " \
                     f"(likeness {pick['likeness']:.2f}{tie})"
        else:
            reason = (f"its trigger prompts' results come nearest the training pictures at {pick['scale']:g} "
                      f"(likeness {pick['likeness']:.2f}{tie}; {rows[-1]['likeness']:.2f} at 1: stronger "
                      "overshoots them)")
        if pick["bleed"] > pick["concept"]:
            reason += "; there its bleed passes its concept strength"
        return pick["scale"], reason
    scale, concept, bleed = 0.0, 0.0, 0.0  # the base model: nothing moved
    for row in rows:
        if row["bleed"] - bleed > row["concept"] - concept:
            if scale == 0.0:
                return rows[0]["scale"], (f"even strength {rows[0]['scale']:g} adds more bleed than concept; "
                                          "the LoRA bleeds at every strength")
            return scale, f"strength beyond {scale:g} adds bleed faster than concept"
        scale, concept, bleed = row["scale"], row["concept"], row["bleed"]
    return scale, f"up to {scale:g} each step of strength adds more concept than bleed"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def recommend(data: dict[str, Any]) -> dict[str, Any]:
    """{label, step, file, scale, text}: the recommended LoRA file and strength, and why, in words."""
    loras = data.get("loras") or []
    if not loras:
        return {"label": None, "step": None, "file": None, "scale": None, "text": "no LoRA was scored"}
    chosen = rank(loras)[0]
    scale, strength_reason = _strength(data, chosen)
    text = f"{_label(chosen)} at {scale:g}: {_checkpoint_reason(loras, chosen)}; {strength_reason}"
    return {"label": chosen.get("label"), "step": chosen.get("step"), "file": chosen.get("file"), "scale": scale,
            "text": text}


def warnings(data: dict[str, Any]) -> list[dict[str, Any]]:
    """[{reason, step, message}]: the held-out loss more than RISE above its lowest at each of the last LoRAs
    (the run's overfit_patience of them, or every one after the lowest when fewer), and the final LoRA's bleed
    passing its concept strength (at strength 1: what a user takes by default)."""
    found = []
    loras = [lora for lora in data.get("loras") or [] if not lora.get("final")] + \
        [lora for lora in data.get("loras") or [] if lora.get("final")]
    measured = [lora for lora in loras if _loss(lora) is not None]
    if measured:
        lowest = min(range(len(measured)), key=lambda i: _loss(measured[i]))
        patience = (data.get("settings") or {}).get("overfit_patience") or PATIENCE
        last = measured[lowest + 1:][-patience:]
        low = _loss(measured[lowest])
        if last and all(_loss(lora) > low * (1 + RISE) for lora in last):
            found.append({"reason": "heldout_rising", "step": last[-1].get("step"), "message": (
                f"the held-out loss rose after {_label(measured[lowest])} ({low:.4g}) and stayed more than "
                f"{RISE:.0%} above it for the last {len(last)} LoRA(s): the LoRA is likely overfitting")})
    final = next((lora for lora in reversed(loras) if lora.get("final")), loras[-1] if loras else None)
    if final is not None and final["bleed"] > final["concept"]:
        found.append({"reason": "bleed_over_concept", "step": final.get("step"), "message": (
            f"the final LoRA's bleed ({final['bleed']:.3g}) passes its concept strength ({final['concept']:.3g}): "
            "at strength 1 prompts without the trigger change more than prompts with it")})
    return found


def curves(data: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each figure by step (the checkpoints, then the final LoRA) at strength 1."""
    result: dict[str, list[tuple[int, float]]] = {name: [] for name in FIGURES}
    for lora in sorted((lora for lora in data.get("loras") or [] if lora.get("step") is not None),
                       key=lambda lora: (lora["step"], bool(lora.get("final")))):
        for name in FIGURES:
            value = lora.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value) and \
                    not (result[name] and result[name][-1][0] == lora["step"]):
                result[name].append((lora["step"], float(value)))
    return result


def table(data: dict[str, Any]) -> list[list[Any]]:
    """One row per scored LoRA at strength 1, then one per other strength: label, scale and the figures."""
    rows = [[lora.get("label"), 1.0, *(lora.get(name) for name in FIGURES)] for lora in data.get("loras") or []]
    rows += [[row.get("label"), row.get("scale"), None, row.get("concept"), row.get("likeness"), row.get("bleed")]
             for row in data.get("strengths") or []]
    return rows


TABLE_HEADERS = ["LoRA", "strength", *FIGURES]
