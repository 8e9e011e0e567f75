"""What a face shows before training: dataset thumbnails and the base model's family (read in a child process,
forked from the page's job starter when it has one, so that the page's server never imports torch).

Thumbnails are small JPEG copies written under the outputs folder, so a page never serves the
original files (which may live anywhere on the server) and stays fast with large images.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from studio.children import run_python
from studio.launcher import job_environment
from studio.starter import Starter

if TYPE_CHECKING:
    from lora_core.dataset import DatasetReport

DESCRIBE_TIMEOUT_S = 180  # a hub model's configs download in the child; a built-in one is built there once
UNCHECKED = "the model could not be checked"  # the check failed, not the model: Start is not refused for it
DESCRIBED_FOR_S = 60.0  # a hub model's (or a folder's) answer is asked again after this long
_described: dict[str, tuple[float, tuple[str, str | None, str | None]]] = {}
_described_lock = threading.Lock()
THUMBNAIL_SIZE = 192
MAX_THUMBNAILS = 120
# The hub models offered in pickers. The family shown is read from the model's own configs.
HUB_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5",
    "stabilityai/stable-diffusion-2-1": "SD 2.1 (768 px, v-prediction)",
    "stabilityai/stable-diffusion-xl-base-1.0": "SDXL 1.0 base",
    "stabilityai/stable-diffusion-3.5-medium": "SD 3.5 Medium (gated: accept its licence on the hub)",
    "stabilityai/stable-diffusion-3.5-large": "SD 3.5 Large (gated)",
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev (gated; non-commercial licence)",
    "black-forest-labs/FLUX.1-schnell": "FLUX.1-schnell (Apache 2.0)",
}
# their families, for the form while the hub cannot be reached (the model's own configs decide otherwise)
HUB_FAMILIES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1", "stabilityai/stable-diffusion-2-1": "sd2",
                "stabilityai/stable-diffusion-xl-base-1.0": "sdxl", "stabilityai/stable-diffusion-3.5-medium": "sd3",
                "stabilityai/stable-diffusion-3.5-large": "sd3", "black-forest-labs/FLUX.1-dev": "flux",
                "black-forest-labs/FLUX.1-schnell": "flux"}


def thumbnails(report: DatasetReport, folder: Path, limit: int = MAX_THUMBNAILS) -> list[tuple[str, str]]:
    """(thumbnail path, caption) for the first `limit` usable images, made once per source file."""
    from lora_core import dataset

    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for record in report.images[:limit]:
        source = Path(record.path)
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = folder / f"{key}.jpg"
        if not target.exists():
            image = dataset.open_image(source, max_side=THUMBNAIL_SIZE)  # decoded downscaled where it can be
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            image.save(target, format="JPEG", quality=85)
        results.append((str(target), f"{source.name} · {record.width}×{record.height} · {record.caption}"))
    return results


def describe_model(base_model: str, starter: Starter | None = None) -> tuple[str, str | None, str | None]:
    """(family in words, None, the family's id) or ("", the problem, None), from a child process (forked from
    `starter` when given): reading a model (lora_core.models, which builds a built-in one the first time)
    imports torch, which the page's server never loads. A built-in's answer is kept for the server's life,
    any other's for DESCRIBED_FOR_S."""
    base_model = base_model.strip()
    if not base_model:
        return "", "choose a base model", None
    with _described_lock:
        when, answer = _described.get(base_model, (-math.inf, None))
    if answer is not None and (base_model.startswith("builtin:") or time.monotonic() - when < DESCRIBED_FOR_S):
        return answer
    code = "import json, sys; from studio.preview import describe_here; print(json.dumps(describe_here(sys.argv[1])))"
    try:  # an answer that did not come is not kept: the next look asks again
        done = run_python(["-c", code, base_model], job_environment(None, 1, None, starter and starter.base),
                          starter, DESCRIBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "", f"{UNCHECKED} (no answer within {DESCRIBE_TIMEOUT_S} s)", None
    try:
        words, problem, family = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "", f"{UNCHECKED} ({(done.stderr.strip().splitlines() or ['no answer'])[-1]})", None
    with _described_lock:
        _described[base_model] = (time.monotonic(), (words, problem, family))
    return words, problem, family


def describe_here(base_model: str) -> tuple[str, str | None, str | None]:
    """`describe_model`'s answer, read in this process (the child's side). Reads the model's configs: a hub
    model's configs are downloaded (a few kB); a built-in one is built the first time (about a second)."""
    from lora_core import models

    try:
        source = models.resolve(base_model, configs_only=True)
        info = models.inspect(source)
    except models.ModelError as error:
        return "", str(error), None
    kind = {"builtin": "built-in model with random weights, for tests and the demo", "hub": "Hugging Face hub",
            "folder": "diffusers folder", "single_file": "single-file checkpoint"}.get(source.kind, source.kind)
    if base_model == "builtin:toy-sd":
        kind = "built-in model pretrained on coloured shapes, drawn at 64 px; the demo teaches it a new colour"
    if source.kind == "folder" and not Path(base_model).expanduser().exists():
        kind = "Hugging Face hub; the weights download when training starts"
    return f"{info.description} · {kind} · sides a multiple of {info.pixel_multiple} px", None, info.family
