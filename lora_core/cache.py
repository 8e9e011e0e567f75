"""What the fit loop trains on: per-image latents and text conditioning, prepared once where they can be.

`build_cache` encodes what does not change between steps, and `Cache.collate` turns a batch of (epoch, entry)
pairs from `buckets.BucketBatchSampler` into a `Batch` with every per-step choice already made (flip, crop,
caption dropout, tag order, VAE noise), each from a generator seeded by (seed, epoch, entry) and never the
global RNG: a resumed run and every process of a multi-process run make the same choices. `Cache.batch` turns
a `Batch` on the device into the UNet's inputs.

What is cached:
- latents, when `latent_cache` is 'memory' (on the device) or 'disk' (files under <output_path>/cache, read each
  step). A horizontal flip is cached as a second latent; a random crop cannot be (the config refuses it).
- text-encoder outputs, when the captions are fixed (no `shuffle_tags`) and the text encoders frozen: one row
  per image, plus the empty caption for `caption_dropout`. Shuffled captions are encoded every step by the
  frozen text encoders; with `train_text_encoder` every caption is, with gradients through their LoRA.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_core import buckets, captions, dataset, models
from lora_core.config import TrainConfig
from lora_core.files import atomic_write


def seed_of(*parts: object) -> int:
    """A well-mixed 63-bit seed from any tuple of values (torch generators seeded with nearby integers
    give correlated first draws)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass
class Batch:
    """One micro-batch of entries of one bucket, with the per-step choices made on the host."""

    images: torch.Tensor  # int64 per sample: index of the image in the dataset report
    rows: torch.Tensor  # int64 per sample: its row in the bucket's latents cached in memory
    flips: torch.Tensor  # bool per sample
    drops: torch.Tensor  # bool per sample: the caption is dropped (empty)
    time_ids: torch.Tensor  # float per sample: SDXL's (orig h, orig w, crop top, crop left, target h, target w)
    bucket: int  # index into Cache.buckets; the same for every sample
    captions: list[str] | None = None  # when captions vary per step; None means the cached embeddings
    latents: torch.Tensor | None = None  # latent_cache 'disk': the latents read from disk
    pixels: torch.Tensor | None = None  # latent_cache 'off': uint8 pixels, cropped and flipped
    noise: torch.Tensor | None = None  # latent_cache 'off': the VAE posterior's noise

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: change(v) if torch.is_tensor(v) else v for name, v in values.items()})

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:  # accelerate moves a batch by .to
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:  # the DataLoader pins a batch by .pin_memory
        return self._map(lambda t: t.pin_memory())


class Keys(torch.utils.data.Dataset):
    """The DataLoader's dataset: each key the sampler yields is its own item; `Cache.collate` does the work."""

    def __init__(self, size: int):
        self.size = size

    def __getitem__(self, key):
        return key

    def __len__(self) -> int:
        return self.size


class Cache:
    def __init__(self, config: TrainConfig, report: dataset.DatasetReport, assigned: list[buckets.Bucket],
                 latent_shape: Callable[[buckets.Bucket], tuple[int, ...]]):
        self.config, self.records = config, report.images
        self.buckets = sorted(set(assigned))
        self.bucket_of_image = [self.buckets.index(bucket) for bucket in assigned]
        seen: dict[int, int] = {}
        self.row_in_bucket = []  # images are numbered within their bucket in dataset order
        for bucket in self.bucket_of_image:
            self.row_in_bucket.append(seen.get(bucket, 0))
            seen[bucket] = self.row_in_bucket[-1] + 1
        self.latent_shape = latent_shape
        self.variants = 2 if config.flip_horizontal else 1  # cached latents: one per side
        self.covers = [buckets.cover_and_crop(r.width, r.height, assigned[i]) for i, r in enumerate(self.records)]
        self.latents: list[torch.Tensor] | None = None  # 'memory': per bucket, rows = row_in_bucket * variants + flip
        self.latent_files: list[list[Path]] | None = None  # 'disk': per image, per variant
        self.pixels: list[torch.Tensor] | None = None  # 'off': uint8, resized to cover the bucket, not cropped
        self.conditioning: dict[str, torch.Tensor] = {}  # fixed captions: name -> one row per image
        self.empty: dict[str, torch.Tensor] = {}  # the empty caption's conditioning, for caption_dropout
        self.encode_text: Callable[[list[str]], dict[str, torch.Tensor]] | None = None  # per-step captions
        self.sample_conditioning: list = []  # [(prompt, pipeline kwargs)]
        self.scaling_factor, self.shift_factor = 1.0, 0.0
        self.dtype = torch.float32

    # --- the data order ---------------------------------------------------------------------------------

    @property
    def entry_buckets(self) -> list[int]:
        """The bucket of each entry: entry e is image e % num_images (each image `repeats` times)."""
        return self.bucket_of_image * self.config.repeats

    def keys(self) -> Keys:
        return Keys(len(self.entry_buckets))

    def batches(self, num_processes: int) -> buckets.BucketBatchSampler:
        return buckets.BucketBatchSampler(self.entry_buckets, self.config.batch_size, self.config.seed,
                                          num_processes)

    # --- per step, on the host ----------------------------------------------------------------------------

    def crop_origin(self, image: int, generator: torch.Generator | None) -> tuple[int, int]:
        """(top, left) of the bucket-sized crop in the covering image: centred, or random when a generator
        is given."""
        bucket = self.buckets[self.bucket_of_image[image]]
        width, height = self.covers[image]
        if generator is None:
            return (height - bucket.height) // 2, (width - bucket.width) // 2
        top = int(torch.randint(0, height - bucket.height + 1, (), generator=generator))
        left = int(torch.randint(0, width - bucket.width + 1, (), generator=generator))
        return top, left

    def collate(self, keys: list[tuple[int, int]]) -> Batch:
        config, count = self.config, len(self.records)
        images, flips, drops, time_ids, texts, pixels, noise = [], [], [], [], [], [], []
        for epoch, entry in keys:
            image = entry % count
            generator = torch.Generator().manual_seed(seed_of(config.seed, epoch, entry))
            # the draws come in a fixed order, each only when its option is on
            drop = captions.dropped(config.caption_dropout, generator)
            flip = config.flip_horizontal and bool(torch.rand((), generator=generator) < 0.5)
            top, left = self.crop_origin(image, generator if config.crop == "random" else None)
            record, bucket = self.records[image], self.buckets[self.bucket_of_image[image]]
            width = self.covers[image][0]
            mirrored_left = width - bucket.width - left if flip else left  # the crop as seen in the flipped image
            images.append(image)
            flips.append(flip)
            drops.append(drop)
            time_ids.append([record.height, record.width, top, mirrored_left, bucket.height, bucket.width])
            if config.shuffle_tags:
                keep = captions.kept_tags(config.trigger_words, config.keep_tokens, config.trigger_placement)
                texts.append("" if drop else captions.shuffle_tags(record.caption, keep, generator))
            elif config.train_text_encoder:  # a trained text encoder sees every caption every step
                texts.append("" if drop else record.caption)
            if self.pixels is not None:
                crop = self.pixels[image][:, top:top + bucket.height, left:left + bucket.width]
                pixels.append(crop.flip(-1) if flip else crop)
                noise.append(torch.randn(self.latent_shape(bucket), generator=generator))
        rows = [self.row_in_bucket[image] * self.variants + int(flip) for image, flip in zip(images, flips,
                                                                                               strict=True)]
        batch = Batch(torch.tensor(images), torch.tensor(rows), torch.tensor(flips), torch.tensor(drops),
                      torch.tensor(time_ids, dtype=torch.float32), self.bucket_of_image[images[0]],
                      captions=texts or None)
        if self.pixels is not None:
            batch.pixels, batch.noise = torch.stack(pixels), torch.stack(noise)
        if self.latent_files is not None:
            batch.latents = torch.stack([load_file(str(self.latent_files[i][int(f)]))["latent"]
                                         for i, f in zip(images, flips, strict=True)])
        return batch

    # --- per step, on the device ----------------------------------------------------------------------------

    def batch(self, batch: Batch, vae, device: torch.device) -> tuple[torch.Tensor, dict]:
        """(latents, UNet conditioning kwargs) for a batch already on the device."""
        return self._latents(batch, vae, device), self._conditioning(batch)

    def _latents(self, batch: Batch, vae, device: torch.device) -> torch.Tensor:
        if self.latents is not None:
            table = self.latents[batch.bucket]
            return table[batch.rows.to(table.device)]
        if batch.latents is not None:
            return batch.latents.to(device, self.dtype)
        pixels = batch.pixels.to(device).float() / 127.5 - 1.0
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
            latents = posterior.mean.float() + posterior.std.float() * batch.noise.to(device)
        return (latents - self.shift_factor) * self.scaling_factor

    def _conditioning(self, batch: Batch) -> dict:
        if batch.captions is not None:
            with torch.set_grad_enabled(self.config.train_text_encoder and torch.is_grad_enabled()):
                conditioning = self.encode_text(batch.captions)
        else:
            conditioning = {}
            for name, table in self.conditioning.items():
                rows = table[batch.images.to(table.device)]
                if name in self.empty:
                    drops = batch.drops.to(table.device).view(-1, *[1] * (rows.dim() - 1))
                    rows = torch.where(drops, self.empty[name], rows)
                conditioning[name] = rows
        if "text_embeds" not in conditioning:
            return conditioning
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": conditioning["text_embeds"],
                                      "time_ids": batch.time_ids.to(conditioning["text_embeds"].dtype)}}


# ----------------------------------------------------------------------------------------------------
# building


def text_encoder(pipeline, family: str, device: torch.device, dtype: torch.dtype
                 ) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """captions -> the UNet's text conditioning (without SDXL's time ids), from the frozen text encoders."""

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if family == "sdxl":
            embeds, _, pooled, _ = pipeline.encode_prompt(texts, device=device, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds.to(dtype), "text_embeds": pooled.to(dtype)}
        embeds, _ = pipeline.encode_prompt(texts, device, 1, False)
        return {"encoder_hidden_states": embeds.to(dtype)}

    return encode


def trained_text_encoder(pipeline, family: str, encoders: list, device: torch.device, dtype: torch.dtype
                         ) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """captions -> the UNet's text conditioning through `encoders` (the pipeline's text encoders, in its order,
    as the accelerator wrapped them, so that their gradients are averaged across processes). It computes what
    `pipeline.encode_prompt` does, which cannot call a wrapped module."""
    tokenizers = [t for t in (getattr(pipeline, "tokenizer", None), getattr(pipeline, "tokenizer_2", None)) if t]

    def tokens(tokenizer, texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        if family != "sdxl":
            embeds = encoders[0](tokens(tokenizers[0], texts), attention_mask=None)[0]
            return {"encoder_hidden_states": embeds.to(dtype)}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            output = encoder(tokens(tokenizer, texts), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(dtype), "text_embeds": pooled.to(dtype)}

    return encode


def sample_conditioning(pipeline, family: str, prompts: list[str], device: torch.device,
                        encode: bool = True) -> list:
    """Each sample prompt's pipeline kwargs (with the empty negative prompt), encoded once; without `encode`
    (a text encoder being trained) the prompt itself, which the pipeline encodes with the current LoRA."""
    if not encode:
        return [(prompt, {"prompt": prompt}) for prompt in prompts]
    results = []
    for prompt in prompts:
        if family == "sdxl":
            pos, neg, pos_pooled, neg_pooled = pipeline.encode_prompt(prompt, device=device,
                                                                      do_classifier_free_guidance=True)
            results.append((prompt, {"prompt_embeds": pos, "negative_prompt_embeds": neg,
                                     "pooled_prompt_embeds": pos_pooled, "negative_pooled_prompt_embeds": neg_pooled}))
        else:
            pos, neg = pipeline.encode_prompt(prompt, device, 1, True, negative_prompt="")
            results.append((prompt, {"prompt_embeds": pos, "negative_prompt_embeds": neg}))
    return results


@torch.no_grad()
def build_cache(config: TrainConfig, pipeline, report: dataset.DatasetReport, assigned: list[buckets.Bucket],
                info: models.ModelInfo, device: torch.device, dtype: torch.dtype) -> Cache:
    """Encode what stays fixed: sample prompts, captions (unless shuffled), latents (unless latent_cache 'off')."""
    vae = pipeline.vae
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    cache = Cache(config, report, assigned, lambda b: (channels, b.height // down, b.width // down))
    cache.scaling_factor = vae.config.scaling_factor
    cache.shift_factor = getattr(vae.config, "shift_factor", None) or 0.0
    cache.dtype = dtype

    encoders = models.text_encoders(pipeline)
    for encoder in encoders:
        encoder.to(device, dtype=dtype)
    encode = text_encoder(pipeline, info.family, device, dtype)
    cache.sample_conditioning = sample_conditioning(pipeline, info.family,
                                                    config.sample_prompts or [", ".join(config.trigger_words)],
                                                    device, encode=not config.train_text_encoder)
    if config.shuffle_tags or config.train_text_encoder:
        cache.encode_text = encode  # the text encoders stay on the device (training replaces this with its own)
    else:
        cache.conditioning = encode([record.caption for record in report.images])
        if config.caption_dropout > 0:
            cache.empty = encode([""])
        for encoder in encoders:
            encoder.to("cpu")

    if config.latent_cache == "off":
        cache.pixels = [dataset.load_covering(record, assigned[i]) for i, record in enumerate(report.images)]
        vae_dtype = torch.float32 if (info.family == "sdxl" and dtype == torch.float16) else dtype
        vae.to(device, dtype=vae_dtype)
        return cache
    vae.to(device, dtype=torch.float32)  # one pass, in fp32: the SDXL VAE overflows in fp16
    if config.latent_cache == "memory":
        cache.latents = _encode_in_memory(cache, vae, device)
    else:
        cache.latent_files = _encode_to_disk(cache, vae, device, Path(config.output_path) / "cache")
    vae.to("cpu")
    return cache


def _variants(cache: Cache, image: int) -> list[torch.Tensor]:
    """The uint8 pixels of each cached variant of one image: centre crop, and its mirror with flips on."""
    bucket = cache.buckets[cache.bucket_of_image[image]]
    top, left = cache.crop_origin(image, None)
    cover = dataset.load_covering(cache.records[image], bucket)
    crop = cover[:, top:top + bucket.height, left:left + bucket.width]
    return [crop, crop.flip(-1)][:cache.variants]


def _encode(vae, pixels: list[torch.Tensor], seeds: list[int], device: torch.device) -> torch.Tensor:
    """fp32 latents (scaled) of same-sized uint8 images, one image per VAE call: a convolution's rounding
    depends on the batch it runs in, so batching would make a latent depend on its neighbours (memory and disk
    caches, or a resumed run, would then differ); one at a time also bounds the pass's memory on small cards.
    Each image's VAE noise comes from its own seed."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = []
    for image, seed in zip(pixels, seeds, strict=True):
        posterior = vae.encode(image.unsqueeze(0).to(device).float() / 127.5 - 1.0).latent_dist
        noise = torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(seed)).to(device)
        latents.append((((posterior.mean + posterior.std * noise) - shift) * vae.config.scaling_factor)[0])
    return torch.stack(latents)


def _encode_in_memory(cache: Cache, vae, device: torch.device) -> list[torch.Tensor]:
    tables = []
    for bucket_index in range(len(cache.buckets)):
        members = [i for i, b in enumerate(cache.bucket_of_image) if b == bucket_index]  # in row_in_bucket order
        pixels, seeds = [], []
        for image in members:
            digest = file_digest(cache.records[image].path)
            for flip, variant in enumerate(_variants(cache, image)):
                pixels.append(variant)
                seeds.append(seed_of(cache.config.seed, digest, flip))
        tables.append(_encode(vae, pixels, seeds, device).to(cache.dtype))
    return tables


def _encode_to_disk(cache: Cache, vae, device: torch.device, folder: Path) -> list[list[Path]]:
    """One file per image and variant, named by a hash of everything its latent depends on; files whose name
    is already there are reused, so a changed image, bucket, crop, flip, model or seed gets a new file."""
    model = model_fingerprint(vae)
    files: list[list[Path]] = []
    for image, record in enumerate(cache.records):
        bucket = cache.buckets[cache.bucket_of_image[image]]
        digest = file_digest(record.path)
        crop = cache.crop_origin(image, None)
        keys = [latent_key(digest, bucket, cache.covers[image], crop, bool(flip), model, cache.config.seed)
                for flip in range(cache.variants)]
        paths = [folder / f"{key}.safetensors" for key in keys]
        missing = [flip for flip, path in enumerate(paths) if not path.is_file()]
        if missing:
            variants = _variants(cache, image)
            latents = _encode(vae, [variants[f] for f in missing],
                              [seed_of(cache.config.seed, digest, f) for f in missing], device)
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
