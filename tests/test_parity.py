"""Parity with the reference: the trainer learns what a plain diffusers-style loop (bench/reference.py) learns.

The two loops draw their randomness differently, so the trainer runs with Taps on its Run's parts (its LoRA
init as set up, and per step the images and latents from its latent source, and its noise and timesteps), and
the reference replays exactly those draws while doing everything else itself: VAE encode of the decoded images,
text encode of the captions every step, noise, target, (min-SNR weighted) MSE, AdamW with clipping. What is
checked is then the trainer's caching, caption building, objective and optimisation.

Same inputs: the demo images are 256 px squares trained at 256 without bucketing, so neither loop resizes (the
trainer's bicubic and the script's bilinear would differ by design); the reference gets the captions written here
(trigger word, then the caption file) and must match the trainer's caption building.

Tolerances: both run in fp32 on the CPU and differ only in op order (the trainer's VAE encodes one image per
call, the reference two per step; the trainer encodes all captions at once). Observed: losses equal to 1e-7
relative; final LoRA weights 2.5e-5 to 7e-5 apart, as an L2 norm relative to the change training made (AdamW
divides by sqrt(v), so a near-zero gradient element's rounding noise can become a step of order the learning
rate: single elements move, the whole update does not). The bounds (1e-5, 1e-3) leave ~100x and ~14x headroom
for other BLAS builds. Anything structurally wrong (target, weighting, scaling factor, a step off) moves the
losses by tens of percent and the weights by the size of the training change itself: the negative control
(min-SNR mismatched) gives 0.33 and 0.55.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import Tap, tiny_config, train_tapped
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import default_collate

from bench.reference import ReferenceLoop, ReferenceSettings
from lora_core import builtin, models
from lora_core.batches import seed_of
from lora_core.config import parse_config
from lora_core.events import Progress
from lora_core.latents import file_digest

pytestmark = pytest.mark.e2e  # every test here trains or serves end to end

STEPS, SEED, LR, TRIGGER = 4, 7, 1e-3, "shapestyle"
LOSS_RTOL = 1e-5  # observed: 0 (SD, bitwise equal), 1.1e-7 (SDXL); a mismatched min-SNR: 0.33
WEIGHT_TOL = 1e-3  # of the largest weight change; observed: 0 (SD), 8e-5 (SDXL); a mismatched min-SNR: 1.5
LATENT_TOL = 1e-5  # the same VAE on the same pixels and noise, 6 images at once against 2; observed: 0


@dataclass
class Recording:
    """What the trainer drew, per step, and what it produced."""

    init: dict[str, torch.Tensor] = field(default_factory=dict)  # the LoRA as peft's state dict, before step 1
    paths: list[list[str]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    noise: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (noise, timesteps)
    losses: list[float] = field(default_factory=list)
    final: dict[str, torch.Tensor] = field(default_factory=dict)


def run_trainer(base_model: str, dataset: Path, output: Path, gamma: float) -> Recording:
    """The trainer's own run, with Taps on its step's parts: the latent source and the noise."""
    record = Recording()

    def on_latents(args, latents):
        batch = args[0]
        record.paths.append([str(run_parts["run"].layout.records[i].path) for i in batch.images.tolist()])
        record.latents.append(latents.detach().clone())

    def on_noise(args, drawn):
        noise, timesteps, _ = drawn
        record.noise.append((noise.clone(), timesteps.clone()))

    run_parts = {}

    def tap_run(run):
        run_parts["run"] = run
        record.init = lora_state(run.bare_unet)  # the LoRA as set up, before step 1
        run.latents = Tap(run.latents, on_latents, "latents")
        run.noise = Tap(run.noise, on_noise)
        run.sample_inputs = []  # the last step's sample images: not compared

    config = tiny_config(dataset, output, steps=STEPS, batch_size=2, learning_rate=LR, min_snr_gamma=gamma,
                         bucketing=False, lr_scheduler="constant", lora_dropout=0.0, max_grad_norm=1.0,
                         mixed_precision="no", progress_steps=1, checkpoint_steps=100, validation_steps=100)
    config["base_model"] = base_model

    def emit(event) -> None:
        if isinstance(event, Progress):
            record.losses.append(event.loss)

    result = train_tapped(parse_config(config), tap_run, emit)
    record.final = lora_state(result.unet)
    return record


class Replay(ReferenceLoop):
    """The reference loop, fed the trainer's images in its order, its LoRA init and its random draws."""

    def __init__(self, pipeline, dataset: Path, record: Recording, settings: ReferenceSettings):
        self.paths = sorted(str(p) for p in dataset.iterdir() if p.suffix in (".png", ".jpg"))
        captions = [caption(Path(p)) for p in self.paths]
        super().__init__(pipeline, [Path(p) for p in self.paths], captions, settings, torch.device("cpu"))
        self.own_init = lora_state(self.unet)  # the script's init: torch.manual_seed(seed), then peft's gaussian
        set_peft_model_state_dict(self.unet, record.init)  # in place: the optimizer keeps the same tensors
        self.record, self.step_index, self.latents = record, 0, []

    def next_batch(self) -> dict:
        paths = self.record.paths[self.step_index]
        batch = default_collate([self.loader.dataset[self.paths.index(p)] for p in paths])
        return {**batch, "paths": paths}

    def sample_posterior(self, posterior, batch: dict) -> torch.Tensor:
        """mean + std * noise, with each image's noise drawn as the trainer's latent cache draws it."""
        noise = [torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
            seed_of(self.settings.seed, file_digest(path), 0))) for path in batch["paths"]]
        return posterior.mean + posterior.std * torch.stack(noise)

    def draw_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latents.append(latents.detach().clone())
        noise, timesteps = self.record.noise[self.step_index]
        self.step_index += 1
        return noise, timesteps


def caption(image: Path) -> str:
    """The trigger word, then the image's caption file if it has one."""
    text = image.with_suffix(".txt")
    return f"{TRIGGER}, {text.read_text().strip()}" if text.is_file() else TRIGGER


def replay(base_model: str, dataset: Path, record: Recording, gamma: float) -> tuple[list[float], Replay]:
    source = models.resolve(base_model)
    pipeline = models.load_pipeline(source, models.inspect(source))
    settings = ReferenceSettings(resolution=256, batch_size=2, rank=4, alpha=8, learning_rate=LR,
                                 max_grad_norm=1.0, seed=SEED, snr_gamma=gamma)
    loop = Replay(pipeline, dataset, record, settings)
    return [loop.step() for _ in range(STEPS)], loop


def weight_error(record: Recording, loop: Replay) -> float:
    """|trainer - reference| over all final LoRA weights, relative to |the change training made| (L2 norms).

    A norm, not the largest element: AdamW divides by sqrt(v), so a gradient element near zero turns rounding
    noise into a step of order the learning rate; that moves single elements, not the whole update."""
    reference = lora_state(loop.unet)
    assert reference.keys() == record.final.keys() == record.init.keys()
    change = torch.cat([(record.final[k] - record.init[k]).flatten() for k in reference]).norm().item()
    assert change > 0
    return torch.cat([(record.final[k] - reference[k]).flatten() for k in reference]).norm().item() / change


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def v_prediction_model(folder: Path) -> str:
    shutil.copytree(builtin.builtin_folder("tiny-sd"), folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_file.write_text(json.dumps({**scheduler, "prediction_type": "v_prediction"}), encoding="utf-8")
    return str(folder)


CASES = {  # base model, min_snr_gamma (v-prediction with min-SNR checks both its target and its weighting)
    "sd-epsilon": ("builtin:tiny-sd", 0.0),
    "sd-epsilon-min-snr": ("builtin:tiny-sd", 5.0),
    "sd-v-prediction-min-snr": ("v-model", 5.0),
    "sdxl-min-snr": ("builtin:tiny-sdxl", 5.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_matches_the_reference_loop(case, dataset_dir, tmp_path):
    base_model, gamma = CASES[case]
    if base_model == "v-model":
        base_model = v_prediction_model(tmp_path / "v-model")
    record = run_trainer(base_model, dataset_dir, tmp_path / "out", gamma)
    assert len(record.losses) == len(record.noise) == STEPS

    losses, loop = replay(base_model, dataset_dir, record, gamma)
    for ours, theirs in zip(record.latents, loop.latents, strict=True):  # pixels, VAE, posterior sample, scaling
        torch.testing.assert_close(ours, theirs, rtol=LATENT_TOL, atol=LATENT_TOL)
    for key, value in record.init.items():  # same seed, same draws: the trainer's init is the script's
        assert torch.equal(loop.own_init[key], value), key
    torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    error = weight_error(record, loop)
    print(f"{case}: losses {record.losses} vs {losses}; weight error {error:.2e}")
    assert error < WEIGHT_TOL

    if case == "sd-epsilon":  # negative control: the same comparison with min-SNR mismatched fails clearly
        wrong_losses, wrong_loop = replay(base_model, dataset_dir, record, 5.0)
        worst = max(abs(a - b) / abs(b) for a, b in zip(wrong_losses, record.losses, strict=True))
        wrong_error = weight_error(record, wrong_loop)
        print(f"mismatched min-SNR: loss error {worst:.2e}, weight error {wrong_error:.2e}")
        assert worst > 100 * LOSS_RTOL and wrong_error > 10 * WEIGHT_TOL
