"""What a run leaves for the people after it: the reproducibility manifest (manifest.py), written when training
starts and completed at the end, and the ComfyUI workflow (comfyui.py), written at the end.

`run_started(run, emit)` and `run_finished(run, final_path, emit)` are called by the training loop on the main
process. Neither may cost the run its result: a file that cannot be written is a `warning` event.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_core import comfyui, manifest, samples
from lora_core.configfile import config_to_file_dict
from lora_core.events import Event, RunWarning

if TYPE_CHECKING:
    from lora_core.setup import Run


def sampling_record(run: Run) -> dict[str, Any]:
    """How the run's samples are drawn: the sample scheduler's class and config, steps, guidance, size, prompts and
    seeds (prompt i draws with seed + i) and the (empty) negative prompt."""
    config = run.config
    sampler = run.family.sample_scheduler(run.pipeline.scheduler.config)
    scheduler = {key: value for key, value in dict(sampler.config).items()
                 if isinstance(value, str | int | float | bool | type(None))}
    scheduler["_class_name"] = type(sampler).__name__
    return {"scheduler": scheduler, "steps": config.sample_inference_steps,
            "guidance": float(run.family.sampling_kwargs(config)["guidance_scale"]),
            "width": config.resolution, "height": config.resolution, "prompts": samples.prompts_of(config),
            "seed": config.seed, "negative_prompt": ""}


def started_manifest(run: Run) -> dict[str, Any]:
    plan, config = run.plan, run.config
    resolved = config.model_copy(update={"steps": plan.total_steps})  # as config.json: the steps as run
    return {
        "format": manifest.FORMAT, "status": "started", "started_at": manifest.now(),
        "config": config_to_file_dict(resolved),
        "datasets": manifest.dataset_hashes(config),
        "packages": manifest.package_versions(),
        "device": manifest.device_info(str(run.device)),
        "git": manifest.git_commit(),
        "seeds": {"seed": config.seed,
                  "sample_seeds": [config.seed + i for i in range(len(samples.prompts_of(config)))]},
        "base_model": manifest.base_model_identity(plan.source),
        "model": {"family": run.info.family, "variant": run.info.variant, "prediction_type": run.info.prediction_type},
        "sampling": sampling_record(run),
        "resumed_from_step": run.step if plan.resume else None,
        "num_processes": plan.num_processes,
    }


def run_started(run: Run, emit: Callable[[Event], None]) -> None:
    try:
        manifest.write(run.plan.output, started_manifest(run))
    except OSError as error:
        emit(RunWarning(message=f"the reproducibility manifest could not be written: {error}", field="output_path"))


def run_finished(run: Run, final_path: Path, emit: Callable[[Event], None]) -> None:
    """Complete the manifest with the final LoRA (its tensors' SHA-256, sd-scripts' `sshs_model_hash`, which the
    file's timestamps do not change) and write the ComfyUI workflow for the run's recommendation."""
    folder = run.plan.output
    try:
        recorded = manifest.read(folder)
        recorded.update(status="complete", completed_at=manifest.now(), step=run.step,
                        final_lora={"file": final_path.name, "tensors_sha256": _tensors_hash(final_path)})
        manifest.write(folder, recorded)
        comfyui.write_workflow(folder, recorded)
    except (OSError, manifest.ManifestError) as error:
        emit(RunWarning(message=f"the manifest or the ComfyUI workflow could not be written: {error}",
                        step=run.step, field="output_path"))


def _tensors_hash(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return (handle.metadata() or {}).get("sshs_model_hash")
