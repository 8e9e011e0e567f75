"""Latent sources: where the step's latents come from, behind one interface.

- `MemoryLatents` ('memory'): every image encoded once, before training, and kept on the device; a horizontal
  flip is cached as a second latent.
- `DiskLatents` ('disk'): the same latents as files under <output_path>/cache, named by a hash of everything
  a latent depends on (reused by later runs while that is unchanged), read each step.
- `EncodedLatents` ('off'): the VAE encodes every step, so a random crop can change each time.

Each has `load(choice, generator)` (per sample, on the host, inside the DataLoader's collate) and
`latents(batch, device)` (per batch, on the device). `encode` and `decode` are the VAE's posterior sample
and the latent scaling/shift, written once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_core import buckets, dataset
from lora_core.batches import Batch, Choice, Layout, seed_of
from lora_core.config import TrainConfig
from lora_core.files import atomic_write


def encode(vae, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled fp32 latents of uint8 pixels (N, 3, H, W): the VAE posterior's mean + std * `noise`, shifted and
    scaled as the UNet expects them."""
    posterior = vae.encode((pixels.float() / 127.5 - 1.0).to(vae.dtype)).latent_dist
    sample = posterior.mean.float() + posterior.std.float() * noise
    return (sample - shift_factor(vae)) * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled latents (encode's inverse, up to the VAE)."""
    latents = latents.to(vae.device, torch.float32) / vae.config.scaling_factor + shift_factor(vae)
    return vae.decode(latents).sample


def shift_factor(vae) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def latent_shape(vae, bucket: buckets.Bucket) -> tuple[int, int, int]:
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, bucket.height // down, bucket.width // down


class EncodedLatents:
    """latent_cache 'off': pixels resized to cover each bucket are kept on the host; each step crops and flips
    them and draws the posterior's noise from the sample's generator, and the VAE encodes on the device."""

    def __init__(self, layout: Layout, vae, shape: Callable[[buckets.Bucket], tuple[int, ...]]):
        self.layout, self.vae = layout, vae
        self.pixels = [dataset.load_covering(record, layout.bucket(i)) for i, record in enumerate(layout.records)]
        self.shapes = {bucket: shape(bucket) for bucket in layout.buckets}

    def load(self, choice: Choice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        bucket = self.layout.bucket(choice.image)
        crop = self.pixels[choice.image][:, choice.top:choice.top + bucket.height,
                                         choice.left:choice.left + bucket.width]
        noise = torch.randn(self.shapes[bucket], generator=generator)
        return {"pixels": crop.flip(-1) if choice.flip else crop, "noise": noise}

    def latents(self, batch: Batch, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            return encode(self.vae, batch.latent_inputs["pixels"].to(device), batch.latent_inputs["noise"].to(device))


class MemoryLatents:
    """latent_cache 'memory': one table per bucket on the device, row = row_in_bucket * variants + flip."""

    def __init__(self, layout: Layout, tables: list[torch.Tensor]):
        self.layout, self.tables = layout, tables

    def load(self, choice: Choice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        row = self.layout.row_in_bucket[choice.image] * self.layout.variants + int(choice.flip)
        return {"rows": torch.tensor(row)}

    def latents(self, batch: Batch, device: torch.device) -> torch.Tensor:
        table = self.tables[batch.bucket]
        return table[batch.latent_inputs["rows"].to(table.device)]


class DiskLatents:
    """latent_cache 'disk': one file per image and variant; collate reads a batch's files."""

    def __init__(self, files: list[list[Path]], dtype: torch.dtype):
        self.files, self.dtype = files, dtype

    def load(self, choice: Choice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"latents": load_file(str(self.files[choice.image][int(choice.flip)]))["latent"]}

    def latents(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch.latent_inputs["latents"].to(device, self.dtype)


LatentSource = MemoryLatents | DiskLatents | EncodedLatents


@torch.no_grad()
def make_latent_source(config: TrainConfig, layout: Layout, vae, device: torch.device, dtype: torch.dtype,
                       vae_dtype: torch.dtype) -> LatentSource:
    """The source `config.latent_cache` asks for, with its one-off encoding pass done (the VAE in fp32: the
    SDXL VAE overflows in fp16; it goes back to the CPU afterwards). 'off' keeps the VAE on the device in
    `vae_dtype`."""
    if config.latent_cache == "off":
        vae.to(device, dtype=vae_dtype)
        return EncodedLatents(layout, vae, lambda bucket: latent_shape(vae, bucket))
    vae.to(device, dtype=torch.float32)
    if config.latent_cache == "memory":
        source: LatentSource = MemoryLatents(layout, _encode_in_memory(config, layout, vae, device, dtype))
    else:
        source = DiskLatents(_encode_to_disk(config, layout, vae, device, Path(config.output_path) / "cache"), dtype)
    vae.to("cpu")
    return source


def cached_variants(layout: Layout, image: int) -> list[torch.Tensor]:
    """The uint8 pixels of each cached variant of one image: centre crop, and its mirror with flips on."""
    bucket = layout.bucket(image)
    top, left = layout.crop_origin(image, None)
    cover = dataset.load_covering(layout.records[image], bucket)
    crop = cover[:, top:top + bucket.height, left:left + bucket.width]
    return [crop, crop.flip(-1)][:layout.variants]


def encode_each(vae, pixels: list[torch.Tensor], seeds: list[int], device: torch.device) -> torch.Tensor:
    """fp32 latents of same-sized uint8 images, one image per VAE call: a convolution's rounding depends on
    the batch it runs in, so batching would make a latent depend on its neighbours (memory and disk caches, or
    a resumed run, would then differ); one at a time also bounds the pass's memory on small cards. Each
    image's VAE noise comes from its own seed."""
    latents = []
    for image, seed in zip(pixels, seeds, strict=True):
        shape = latent_shape(vae, buckets.Bucket(image.shape[2], image.shape[1]))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
        latents.append(encode(vae, image.unsqueeze(0).to(device), noise)[0])
    return torch.stack(latents)


def _encode_in_memory(config: TrainConfig, layout: Layout, vae, device: torch.device,
                      dtype: torch.dtype) -> list[torch.Tensor]:
    tables = []
    for bucket_index in range(len(layout.buckets)):
        members = [i for i, b in enumerate(layout.bucket_of_image) if b == bucket_index]  # in row_in_bucket order
        pixels, seeds = [], []
        for image in members:
            digest = file_digest(layout.records[image].path)
            for flip, variant in enumerate(cached_variants(layout, image)):
                pixels.append(variant)
                seeds.append(seed_of(config.seed, digest, flip))
        tables.append(encode_each(vae, pixels, seeds, device).to(dtype))
    return tables


def _encode_to_disk(config: TrainConfig, layout: Layout, vae, device: torch.device, folder: Path) -> list[list[Path]]:
    """One file per image and variant, named by a hash of everything its latent depends on; files whose name
    is already there are reused, so a changed image, bucket, crop, flip, model or seed gets a new file."""
    model = model_fingerprint(vae)
    files: list[list[Path]] = []
    for image, record in enumerate(layout.records):
        digest = file_digest(record.path)
        crop = layout.crop_origin(image, None)
        keys = [latent_key(digest, layout.bucket(image), layout.covers[image], crop, bool(flip), model, config.seed)
                for flip in range(layout.variants)]
        paths = [folder / f"{key}.safetensors" for key in keys]
        missing = [flip for flip, path in enumerate(paths) if not path.is_file()]
        if missing:
            variants = cached_variants(layout, image)
            latents = encode_each(vae, [variants[f] for f in missing],
                                   [seed_of(config.seed, digest, f) for f in missing], device)
            for flip, latent in zip(missing, latents, strict=True):
                tensor = latent.cpu().contiguous()
                atomic_write(paths[flip], lambda tmp, t=tensor: save_file({"latent": t}, str(tmp)))
        files.append(paths)
    return files


def file_digest(path: str | Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def latent_key(image_digest: str, bucket: buckets.Bucket, cover: tuple[int, int], crop: tuple[int, int],
               flip: bool, model: str, seed: int) -> str:
    fields = {"image": image_digest, "bucket": [bucket.width, bucket.height], "cover": list(cover),
              "crop": list(crop), "flip": flip, "model": model, "seed": seed, "version": 1}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def model_fingerprint(vae) -> str:
    """A hash of the VAE's config and a sample of every weight: changes when the model does, cheaply."""
    hasher = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        hasher.update(f"{name}{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return hasher.hexdigest()
