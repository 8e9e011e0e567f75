"""Helpers shared by the tests (fixtures stay in conftest.py): paths, the tiny config, the step's data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
SHAPES_DATASET = ROOT / "tests" / "data" / "shapes"  # the tiny random models' pictures (the demo's were these)
# Between two polls of a page's endpoint: one poll through gradio costs about 85 ms of CPU (client and server,
# both in the test's process), so polling every 0.2 s took a third of a core from the job being waited for.
POLL_S = 0.5


def tiny_config(dataset: Path, output: Path, **overrides) -> dict:
    """The smallest config that exercises every event: 256 px, rank 4 (alpha 8 so alpha != rank)."""
    config = {
        "dataset_path": str(dataset),
        "base_model": "builtin:tiny-sd",
        "output_path": str(output),
        "trigger_words": ["shapestyle"],
        "training_params": {
            "steps": 6, "resolution": 256, "batch_size": 2, "learning_rate": 1e-3, "lora_rank": 4,
            "lora_alpha": 8, "checkpoint_steps": 3, "validation_steps": 3, "sample_inference_steps": 2,
            "seed": 7,
        },
    }
    config["training_params"].update(overrides)
    return config


def step_data(config, pipeline, info, device=None) -> SimpleNamespace:
    """What `training.setup` builds for the step's data, in fp32 on the CPU, without the rest of the run:
    `layout`, `latents` (the latent source), `conditioning` (cached for fixed captions, else encoded each
    step by the frozen text encoders) and `collate`."""
    import torch

    from lora_core import batches, conditioning, dataset, families, latents

    device = device or torch.device("cpu")
    report = dataset.scan(config.dataset_path, config.trigger_words, config.trigger_placement)
    layout = batches.Layout(config, report, dataset.assign_buckets(report, config, info.pixel_multiple))
    family = families.get(info.family)
    source = latents.make_latent_source(config, layout, pipeline.vae, device, torch.float32, torch.float32)
    encode = conditioning.frozen_encoder(family, pipeline, device, torch.float32)
    if config.shuffle_tags:
        text = conditioning.EncodedConditioning(family, encode, trains=False)
    else:
        text = conditioning.cache_captions(family, encode, [r.caption for r in report.images],
                                           config.caption_dropout > 0)
    return SimpleNamespace(layout=layout, latents=source, conditioning=text,
                           collate=batches.Collate(config, layout, source))


class Tap:
    """Stands in for a part of a training Run (its latent source, conditioning or noise): `method` calls
    through to the part, then hands (args, result) to `record`; everything else is the part's own."""

    def __init__(self, inner, record, method: str = "__call__"):
        self._inner, self._record, self._method = inner, record, method

    def __getattr__(self, name: str):
        value = getattr(self._inner, name)
        if name != self._method:
            return value

        def tapped(*args):
            result = value(*args)
            self._record(args, result)
            return result

        return tapped

    def __call__(self, *args):
        return self.__getattr__("__call__")(*args)


def train_tapped(config, tap_run, emit=None, should_stop=None):
    """`training.train`, with `tap_run(run)` called between setup and fit (to put Taps on the run's parts)."""
    from lora_core import training
    from lora_core.plan import make_plan

    run = training.setup(make_plan(config, 1))
    tap_run(run)
    return training.train_run(run, emit or (lambda event: None), should_stop or (lambda: False))


def run_job_here(config, resume: bool = False, stop_after_step: int | None = None) -> tuple:
    """Run one job in this process through the engine's `run_job` (what `python -m lora_core train` does):
    (final event, every event). With `stop_after_step`, a stop is asked once that step's progress is seen."""
    from lora_core.job import run_job

    events: list = []

    def should_stop() -> bool:
        return stop_after_step is not None and any(e.type == "progress" and e.step >= stop_after_step
                                                   for e in events)

    terminal = run_job(config, events.append, should_stop, resume=resume)
    return terminal, events


def make_dataset(folder: Path, count: int = 4) -> Path:
    """A small dataset of a test's own (the demo's content may change): copies of the demo's first images,
    each with a caption of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(path for path in SHAPES_DATASET.iterdir() if path.suffix in (".png", ".jpg"))[:count]
    for index, image in enumerate(images):
        (folder / f"image_{index}{image.suffix}").write_bytes(image.read_bytes())
        (folder / f"image_{index}.txt").write_text(f"a shape number {index}")
    return folder


def wait_until(done, timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll `done()` every 0.1 s; fail naming `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_summary(refresh: tuple) -> dict | None:
    """The hidden run summary among a page refresh's parts (None when the page skipped an unchanged view)."""
    return next((part for part in refresh if isinstance(part, dict) and "job_id" in part), None)


PAGES_HERE: dict[str, object] = {}  # url -> the Studio of a page server launched in the test's process


def launch_page(*args: str) -> tuple:
    """`python webui.py ARGS` as a server in this process, on a free port: (demo, studio, url)."""
    import webui

    demo, studio, settings = webui.make_app(webui.parse_args(list(args)))
    settings.pop("server_port")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **settings)
    url = url.rstrip("/")
    PAGES_HERE[url] = studio
    return demo, studio, url


def wait_for_job(client, job_id: str, done, timeout: float = 180.0) -> dict:
    """Poll the page's `run` endpoint for one job until `done(state)`; fail with the last state on timeout.

    For a page server in this process, the wait itself watches its Studio (what `run` answers, without a poll
    through gradio, which costs ~85 ms of CPU taken from the job); the state returned is still the endpoint's."""
    import time

    deadline = time.monotonic() + timeout
    studio = PAGES_HERE.get(client.src.rstrip("/"))
    if studio is not None:
        from studio.render import run_summary as summary_of

        while time.monotonic() < deadline and not done(summary_of(studio.view(job_id))):
            time.sleep(0.1)
    state: dict = {}
    while time.monotonic() < deadline:
        state = client.predict(job_id, api_name="/run")
        if done(state):
            return state
        time.sleep(POLL_S)
    raise AssertionError(f"timed out; last state {state}")
