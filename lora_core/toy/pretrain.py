"""Pretraining the toy model on its world, on the CPU in well under an hour, deterministic for a seed.

Stage 1 trains the autoencoder (VAE) as a general codec of flat-coloured shapes: random colours, so it can
encode and decode any colour, the held-out one included (as SD's VAE can any picture). Stage 2 trains the
UNet and the text encoder together on the vocabulary's captioned pictures only (never the held-out colour),
with 10 % of captions dropped so that classifier-free guidance works. Prints the loss as it goes.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_core.toy import model, world

SEED = 1234
VAE_STEPS, VAE_BATCH, VAE_LR = 1500, 16, 2e-3
VAE_CROP = 32  # the codec is convolutional: it learns edges and flat colour as well from quarter crops, 4x faster
LATENT_NOISE = 0.1  # the codec's posterior std, fixed: latents carry this much noise in training and use
MEAN_WEIGHT = 1e-4  # keeps the latent means from growing to drown that noise
UNET_STEPS, UNET_BATCH, UNET_LR = 2000, 32, 1.5e-3
MIN_SNR = 5.0  # min-SNR loss weighting (Hang et al. 2023): the same model in fewer steps
POOL_PER_SCENE = 24  # pictures of each vocabulary scene encoded once for stage 2
CAPTION_DROP = 0.1


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def random_colour_picture(rng: random.Random) -> Image.Image:
    """A shape in any colour on any other: the codec's training pictures."""
    palette = dict(world.COLOURS)
    colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    if rng.random() < 0.5:  # half the time named colours, the ones it will mostly see
        colours = [palette[name] for name in rng.sample(sorted(palette), 2)]
    world.COLOURS["_fg"], world.COLOURS["_bg"] = colours  # drawn through the world's own drawing
    try:
        return world.draw(world.Scene(rng.choice(world.SHAPES), "_fg", "_bg"), rng)
    finally:
        del world.COLOURS["_fg"], world.COLOURS["_bg"]


def crop(picture: Image.Image, rng: random.Random) -> Image.Image:
    left, top = rng.randrange(world.SIZE - VAE_CROP + 1), rng.randrange(world.SIZE - VAE_CROP + 1)
    return picture.crop((left, top, left + VAE_CROP, top + VAE_CROP))


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, seed: int, steps: int = VAE_STEPS, log=print) -> float:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    started, loss = time.time(), float("nan")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, VAE_LR)
        pictures = to_tensor([crop(random_colour_picture(rng), rng) for _ in range(VAE_BATCH)])
        mean = vae.encode(pictures).latent_dist.mean
        rebuilt = vae.decode(mean + LATENT_NOISE * torch.randn(mean.shape, generator=generator)).sample
        reconstruction = (rebuilt - pictures).pow(2).mean()
        total = reconstruction + MEAN_WEIGHT * mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        loss = float(reconstruction.detach())
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} reconstruction {loss:.4f} ({time.time() - started:.0f} s)")
    fix_posterior_std(vae)
    vae.eval()
    return loss


@torch.no_grad()
def fix_posterior_std(vae) -> None:
    """The encoder's log-variance outputs set to the constant the decoder was trained with (LATENT_NOISE), so
    `latent_dist.sample()`, as the trainer draws latents, gives what the decoder expects."""
    channels = vae.config.latent_channels
    vae.quant_conv.weight[channels:] = 0.0
    vae.quant_conv.bias[channels:] = 2 * math.log(LATENT_NOISE)


@torch.no_grad()
def encode_pool(vae, seed: int, per_scene: int = POOL_PER_SCENE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every vocabulary scene drawn `per_scene` times, encoded once: (means, stds, captions)."""
    pictures = world.sample_scenes(per_scene * len(world.vocabulary()), seed)
    means, stds = [], []
    for start in range(0, len(pictures), 64):
        posterior = vae.encode(to_tensor([image for _, image in pictures[start:start + 64]])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [scene.caption() for scene, _ in pictures]


def train_denoiser(pipeline, seed: int, steps: int = UNET_STEPS, log=print, every=None,
                   per_scene: int = POOL_PER_SCENE) -> float:
    """UNet and text encoder together on the encoded vocabulary, epsilon prediction as SD 1.x; `every(step)`
    is called each 250 steps (to save a checkpoint)."""
    means, stds, captions = encode_pool(pipeline.vae, seed, per_scene)
    scale = 1.0 / float(means.std())
    pipeline.vae.register_to_config(scaling_factor=scale)
    log(f"latents: {len(captions)} pictures, scaling factor {scale:.4f}")
    texts = sorted(set(captions)) + [""]
    tokens = pipeline.tokenizer(texts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    caption_index = torch.tensor([texts.index(caption) for caption in captions])
    generator = torch.Generator().manual_seed(seed)
    unet, text_encoder, noise_scheduler = pipeline.unet, pipeline.text_encoder, pipeline.scheduler
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=UNET_LR, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    started, loss, average = time.time(), float("nan"), None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, UNET_LR, warmup=100)
        batch = torch.randint(0, len(captions), (UNET_BATCH,), generator=generator)
        latent = (means[batch] + stds[batch] * torch.randn(means[batch].shape, generator=generator)) * scale
        chosen = caption_index[batch].clone()
        chosen[torch.rand(UNET_BATCH, generator=generator) < CAPTION_DROP] = len(texts) - 1
        noise = torch.randn(latent.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=generator)
        noisy = noise_scheduler.add_noise(latent, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(tokens[chosen])[0]).sample
        snr = noise_scheduler.alphas_cumprod[timesteps] / (1 - noise_scheduler.alphas_cumprod[timesteps])
        weight = snr.clamp(max=MIN_SNR) / snr
        mse = ((prediction - noise).pow(2).mean(dim=(1, 2, 3)) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        loss = float(mse.detach())
        average = loss if average is None else 0.98 * average + 0.02 * loss
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps} loss {loss:.4f} (smoothed {average:.4f}, {time.time() - started:.0f} s)")
        if every is not None and (step + 1) % 250 == 0:
            every(step + 1)
    unet.eval()
    text_encoder.eval()
    return average


def pretrain(output: Path, seed: int = SEED, vae_steps: int = VAE_STEPS, unet_steps: int = UNET_STEPS,
             log=print, per_scene: int = POOL_PER_SCENE) -> Path:
    """Both stages from fresh weights; the pipeline saved as a diffusers folder in `output`."""
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = model.fresh_pipeline(Path(scratch) / "tokenizer", seed)
        train_vae(pipeline.vae, seed, vae_steps, log)
        train_denoiser(pipeline, seed, unet_steps, log, per_scene=per_scene)
        pipeline.save_pretrained(output, safe_serialization=True)
    return output
