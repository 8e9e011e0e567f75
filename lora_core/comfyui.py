"""`comfyui_workflow.json`: the run's recommended LoRA in a ComfyUI workflow (API "prompt" format) that draws the
run's sample prompts as its samples were drawn: the same base model, sampler, steps, guidance, shift, seeds and
size. Built from the run's manifest (manifest.json: the config, the model's family and how the samples were
drawn), so it can be rewritten at any time without loading a model: `write_workflow(run_folder)` after the
recommended checkpoint or strength changes. The family builds the graph (families/comfy.py).

ComfyUI knows models by their file names in its models folders; a hub id or a diffusers folder has none, so the
base model's name is a placeholder derived from the model (`flux1-dev.safetensors`) that the user replaces with
their own file's name. Torch-free: the page calls it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_core import families, manifest
from lora_core.families.comfy import ComfySettings, sampler_names
from lora_core.files import atomic_write_text

WORKFLOW_FILE = "comfyui_workflow.json"
SCORES_FILE = "scores.json"
FINAL_LORA = "lora_final.safetensors"
DEFAULT_STRENGTH = 1.0


def recommendation(run_folder: str | Path) -> tuple[str, float]:
    """The LoRA file (relative to the run folder) and strength to use: what the run's scores.json recommends
    (`{"recommended": {"lora": "<file>", "strength": x}}`, written by the scoring; the file relative to the run
    folder, absolute, or a checkpoint's file name), else the final LoRA at 1.0. A recommendation naming a file
    the run does not have is ignored."""
    folder = Path(run_folder)
    try:
        recommended = json.loads((folder / SCORES_FILE).read_text(encoding="utf-8"))["recommended"]
        lora, strength = str(recommended["lora"]), float(recommended["strength"])
    except (OSError, ValueError, KeyError, TypeError):
        return FINAL_LORA, DEFAULT_STRENGTH
    root = folder.resolve()
    # the file relative to the run folder (or absolute), or a checkpoint named by its file name alone
    for candidate in (folder / lora, folder / "checkpoints" / Path(lora).name):
        path = candidate.resolve()
        if path.is_file() and root in path.parents:
            return path.relative_to(root).as_posix(), strength
    return FINAL_LORA, DEFAULT_STRENGTH


def placeholder_name(base_model: str) -> str:
    """The base model's file name as ComfyUI would list it: a single file's own name, else one derived from the
    hub id, folder or built-in name (`black-forest-labs/FLUX.1-dev` -> `flux1-dev.safetensors`)."""
    name = base_model.rstrip("/\\").replace("\\", "/").rpartition("/")[2].rpartition(":")[2]
    if name.lower().endswith(".safetensors"):
        return name
    name = re.sub(r"(?<=[a-z])\.(?=\d)", "", name.lower())  # FLUX.1 -> flux1, as BFL names its file
    return f"{re.sub(r'[^a-z0-9._-]+', '-', name).strip('-') or 'base-model'}.safetensors"


def settings(run_folder: str | Path, recorded: dict[str, Any] | None = None) -> ComfySettings:
    """What the workflow draws, from the run's manifest and its recommendation."""
    recorded = recorded if recorded is not None else manifest.read(run_folder)
    sampling, model = recorded.get("sampling"), recorded.get("model")
    if not isinstance(sampling, dict) or not isinstance(model, dict):
        raise manifest.ManifestError(f"{run_folder}/{manifest.MANIFEST_FILE} does not say how the samples were "
                                     "drawn (a run that stopped before training started)")
    config = recorded["config"]
    options = {**config, **config.get("training_params", {})}
    lora, strength = recommendation(run_folder)
    return ComfySettings(
        model_file=placeholder_name(str(config["base_model"])), lora_file=Path(lora).name, strength=strength,
        prompts=list(sampling["prompts"]), seed=int(sampling["seed"]), steps=int(sampling["steps"]),
        guidance=float(sampling["guidance"]), width=int(sampling["width"]), height=int(sampling["height"]),
        scheduler=dict(sampling["scheduler"]), prediction_type=str(model.get("prediction_type", "epsilon")),
        zero_terminal_snr=bool(options.get("zero_terminal_snr", False)), variant=str(model.get("variant", "")),
        negative_prompt=str(sampling.get("negative_prompt", "")), uses_t5=bool(options.get("use_t5_encoder", True)))


def workflow(run_folder: str | Path, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ComfyUI workflow in the API format (POST it to ComfyUI's /prompt as {"prompt": ...})."""
    recorded = recorded if recorded is not None else manifest.read(run_folder)
    return families.get(recorded["model"]["family"]).comfyui_graph(settings(run_folder, recorded))


def write_workflow(run_folder: str | Path, recorded: dict[str, Any] | None = None) -> Path:
    """(Re)write the run's comfyui_workflow.json, for its current recommendation; call it again whenever the
    recommended LoRA or strength changes."""
    return atomic_write_text(Path(run_folder) / WORKFLOW_FILE,
                             json.dumps(workflow(run_folder, recorded), indent=2) + "\n")


def how_it_differs(recorded: dict[str, Any]) -> str:
    """Where ComfyUI's sampler cannot draw exactly as diffusers did, in words (for the README and the page)."""
    return sampler_names(recorded.get("sampling", {}).get("scheduler", {}))[2]
