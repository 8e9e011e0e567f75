"""Checks before training (`--validate-only`): config, dataset, base model, output folder, device, memory.

Nothing is trained and no weights are loaded: the memory estimate is computed from the model's configs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_core import buckets, dataset, distributed, hardware, models, tracking
from lora_core.config import TrainConfig
from lora_core.errors import UserError


class OutputFolderError(UserError, OSError):
    field = "output_path"


def check_output_folder(output_path: str, keep: bool = True) -> str | None:
    """None when the folder can be created and written, else the reason. Folders this made are removed
    again when it is refused, or when `keep` is False (--validate-only writes nothing)."""
    folder = Path(output_path)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        reason = None
        if shutil.disk_usage(folder).free < 256 * 1024**2:
            reason = f"less than 256 MB free on the disk of {folder}; free space or choose another output_path"
    except OSError as error:
        reason = f"cannot write to {folder}: {error.strerror or error}; choose a writable output_path"
    if reason is not None or not keep:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
    return reason


def preflight(config: TrainConfig, num_processes: int | None = None) -> dict[str, Any]:
    """A JSON-ready report; `ok` is False when training would fail, with each problem naming its field.

    `num_processes`: data-parallel processes (devices) the run will use; by default the launcher's count."""
    from lora_core.training import check_resolution, total_steps_for

    report: dict[str, Any] = {"ok": True, "problems": [], "warnings": []}
    processes = num_processes or distributed.world_size()

    def problem(field: str, message: str) -> None:
        report["ok"] = False
        report["problems"].append({"field": field, "message": message})

    scanned = None
    try:
        scanned = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement)
        report["dataset"] = {"num_images": len(scanned.images), "num_captioned": scanned.captioned,
                             "refused": scanned.refused, "ignored": scanned.ignored}
        report["total_steps"] = total_steps_for(config, len(scanned.images), processes)
    except dataset.DatasetError as error:
        problem("dataset_path", str(error))

    info = source = None
    try:
        source = models.resolve(config.base_model, configs_only=True)
        info = models.inspect(source)
        report["model"] = {"source": source.kind, "family": info.description,
                           "prediction_type": info.prediction_type}
        check_resolution(config, info)
        if scanned is not None:  # the bucket table, and the length as the buckets make it
            assigned = dataset.assign_buckets(scanned, config, info.pixel_multiple)
            report["dataset"]["buckets"] = scanned.buckets
            per_epoch = buckets.batches_per_epoch(assigned * config.repeats, config.batch_size * processes)
            report["total_steps"] = total_steps_for(config, len(scanned.images), processes, per_epoch)
    except models.ModelError as error:
        problem("base_model", str(error))
    except ValueError as error:
        problem("resolution", str(error))

    if (reason := check_output_folder(config.output_path, keep=False)) is not None:
        problem("output_path", reason)
    if (reason := tracking.unavailable_reason(config)) is not None:
        problem("log_with", reason)

    try:
        device = hardware.pick_device(config)
        precision = hardware.resolve_precision(config, device)
        info_device = hardware.describe(device)
        report["device"] = {**info_device.to_dict(), "mixed_precision": precision}
        report["devices"] = {"available": info_device.count, "processes": processes,
                             "global_batch_size": config.batch_size * config.gradient_accumulation_steps * processes}
        if device.type == "cuda" and processes > info_device.count:
            report["warnings"].append(f"{processes} processes but {info_device.count} CUDA devices are visible; "
                                      "use one process per GPU")
    except RuntimeError as error:
        problem("device", str(error))
        return report

    if info is not None and source is not None:
        sizes = models.model_sizes(source, info)
        checkpointing = hardware.use_gradient_checkpointing(config, precision, hardware.free_device_memory_gib(
            device), lambda: sizes)
        estimate = hardware.estimate_memory(config, sizes, precision, checkpointing)
        report["memory_estimate"] = estimate.to_dict()
        free = info_device.free_memory_gib
        if free is not None and estimate.total_gib > free:
            report["warnings"].append(f"the run needs about {estimate.total_gib} GiB but {free} GiB is free on "
                                      f"{info_device.name}; lower batch_size or resolution"
                                      + ("" if checkpointing else ", or set gradient_checkpointing to 'on'"))
    return report
