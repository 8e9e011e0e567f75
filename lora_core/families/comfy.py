"""ComfyUI workflows in the API ("prompt") format, one graph builder per kind of model (the families pick theirs
with `Family.comfyui_graph`), and the mapping from the diffusers scheduler a run's samples used to ComfyUI's
`sampler_name` / `scheduler`.

A graph is `{node id: {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}}`; an input that takes
another node's output is `[node id, output index]`. Only ComfyUI's core nodes are used (nodes.py,
comfy_extras/nodes_flux.py, nodes_sd3.py, nodes_model_advanced.py); tests/data/comfyui_nodes.json records their
required inputs and output types as read from ComfyUI's code, and the tests check every graph against it.
Torch-free: the page and the CLI call it without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ComfySettings:
    """What a workflow draws: the run's models (ComfyUI file names), its LoRA and the samples' settings."""

    model_file: str  # the base model's file name in ComfyUI's models folder (a placeholder the user adjusts)
    lora_file: str  # the LoRA's file name in models/loras
    strength: float
    prompts: list[str]
    seed: int  # the first prompt's seed; prompt i draws with seed + i, as the trainer's samples do
    steps: int
    guidance: float  # classifier-free guidance (cfg), or FLUX.1-dev's distilled guidance
    width: int
    height: int
    scheduler: dict[str, Any]  # the diffusers sample scheduler's class (`_class_name`) and config
    prediction_type: str = "epsilon"  # epsilon | v_prediction | flow
    zero_terminal_snr: bool = False
    variant: str = ""  # FLUX.1: dev | schnell
    text_encoders: dict[str, str] = field(default_factory=dict)  # role -> ComfyUI file name (flow models)
    negative_prompt: str = ""  # the samples' negative prompt: empty
    uses_t5: bool = True  # SD 3 trained without T5-XXL (use_t5_encoder off) draws with the two CLIPs alone


class Graph:
    """An API-format graph under construction: nodes numbered in the order they are added."""

    def __init__(self):
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, title: str, **inputs: Any) -> str:
        node = str(len(self.nodes) + 1)
        self.nodes[node] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node


def out(node: str, index: int = 0) -> list:
    """A link to output `index` of `node`."""
    return [node, index]


def sampler_names(scheduler: dict[str, Any]) -> tuple[str, str, str]:
    """ComfyUI's (sampler_name, scheduler) for a diffusers scheduler config, and what is not exact in words.

    DPM-Solver++ multistep (2nd order) is ComfyUI's `dpmpp_2m` (the SDE variant `dpmpp_2m_sde`). Its timesteps:
    `karras` / `exponential` sigmas when the config asks for those; diffusers' `linspace` and `trailing` spacing
    (999 down to about 1000/steps) is ComfyUI's `sgm_uniform` (the same points, unrounded); its `leading` spacing
    (SD 1.5's config: steps of 1000 // (steps + 1), starting below 999) has no twin, and `ddim_uniform` (steps of
    1000 // steps from 1 up) is the nearest. Flow-match Euler is `euler` with the `simple` schedule over the
    shifted sigmas (the shift itself comes from ModelSamplingSD3 / ModelSamplingFlux); diffusers spaces sigmas
    linearly from 1 to 1/steps before shifting, ComfyUI takes every n-th of its 1000 shifted sigmas, so the steps
    land close but not on the same values."""
    kind = scheduler.get("_class_name", "")
    spacing = scheduler.get("timestep_spacing", "linspace")
    if kind == "DPMSolverMultistepScheduler":
        name = "dpmpp_2m_sde" if "sde" in scheduler.get("algorithm_type", "dpmsolver++") else "dpmpp_2m"
        if scheduler.get("use_karras_sigmas") or scheduler.get("use_exponential_sigmas"):
            schedule = "karras" if scheduler.get("use_karras_sigmas") else "exponential"
            note = f"DPM-Solver++ 2M with {schedule} sigmas as {name}/{schedule}"
        elif spacing == "leading":
            schedule = "ddim_uniform"
            note = (f"DPM-Solver++ 2M as {name}/ddim_uniform; diffusers' leading spacing steps by 1000 // (steps + 1) "
                    "and ComfyUI's ddim_uniform by 1000 // steps, so the timesteps sit a little apart")
        else:
            schedule = "sgm_uniform"
            note = f"DPM-Solver++ 2M as {name}/sgm_uniform: the {spacing} timesteps, not rounded to integers"
        return name, schedule, note
    if kind == "FlowMatchEulerDiscreteScheduler":
        return "euler", "simple", ("flow-match Euler as euler/simple; diffusers spaces sigmas linearly before the "
                                   "shift, ComfyUI steps through the model's shifted sigma table")
    if kind == "EulerAncestralDiscreteScheduler":
        return "euler_ancestral", "normal", "Euler ancestral as euler_ancestral/normal"
    if kind == "EulerDiscreteScheduler":
        return "euler", "karras" if scheduler.get("use_karras_sigmas") else "normal", "Euler as euler"
    if kind == "DDIMScheduler":
        return "ddim", "ddim_uniform", "DDIM as ddim/ddim_uniform"
    return "euler", "normal", f"{kind or 'an unknown scheduler'} has no ComfyUI twin: euler/normal stands in"


def _draw(graph: Graph, s: ComfySettings, model: list, clip: list, vae: list, latent: list, cfg: float,
          conditioning=None) -> None:
    """One KSampler -> VAEDecode -> SaveImage chain per prompt, sharing the models, the negative and the latent;
    `conditioning(node)` wraps a prompt's encoding (FLUX's guidance)."""
    sampler, schedule, _ = sampler_names(s.scheduler)
    negative = graph.add("CLIPTextEncode", "Negative prompt (empty, as the samples)", text=s.negative_prompt,
                         clip=clip)
    for index, prompt in enumerate(s.prompts):
        positive = out(graph.add("CLIPTextEncode", f"Prompt {index + 1}", text=prompt, clip=clip))
        if conditioning is not None:
            positive = conditioning(positive, index)
        drawn = graph.add("KSampler", f"Sampler {index + 1}", model=model, seed=s.seed + index, steps=s.steps,
                          cfg=cfg, sampler_name=sampler, scheduler=schedule, positive=positive,
                          negative=out(negative), latent_image=latent, denoise=1.0)
        image = graph.add("VAEDecode", f"Decode {index + 1}", samples=out(drawn), vae=vae)
        graph.add("SaveImage", f"Save {index + 1}", images=out(image), filename_prefix=f"lora_studio_{index + 1}")


def _lora(graph: Graph, s: ComfySettings, model: list, clip: list) -> tuple[list, list]:
    node = graph.add("LoraLoader", "LoRA", model=model, clip=clip, lora_name=s.lora_file,
                     strength_model=s.strength, strength_clip=s.strength)
    return out(node, 0), out(node, 1)


def checkpoint_graph(s: ComfySettings) -> dict[str, dict[str, Any]]:
    """SD 1.x / 2.x / SDXL: one checkpoint file holds UNet, CLIP and VAE; classifier-free guidance; a
    v-prediction (or zero-terminal-SNR) model says so through ModelSamplingDiscrete."""
    graph = Graph()
    loader = graph.add("CheckpointLoaderSimple", "Base model (pick your file)", ckpt_name=s.model_file)
    model = out(loader, 0)
    if s.prediction_type == "v_prediction" or s.zero_terminal_snr:
        model = out(graph.add("ModelSamplingDiscrete", "Prediction type",
                              model=model, sampling="v_prediction" if s.prediction_type == "v_prediction" else "eps",
                              zsnr=s.zero_terminal_snr))
    model, clip = _lora(graph, s, model, out(loader, 1))
    latent = out(graph.add("EmptyLatentImage", "Size", width=s.width, height=s.height, batch_size=1))
    _draw(graph, s, model, clip, out(loader, 2), latent, s.guidance)
    return graph.nodes


def flux_graph(s: ComfySettings) -> dict[str, dict[str, Any]]:
    """FLUX.1: the transformer (UNETLoader), CLIP-L + T5-XXL (DualCLIPLoader, type flux) and the VAE as separate
    files; dev draws with its distilled guidance (FluxGuidance) at cfg 1, schnell without; the resolution-dependent
    shift of diffusers' dynamic shifting is ModelSamplingFlux's, from the same base/max shift."""
    graph = Graph()
    model = out(graph.add("UNETLoader", "FLUX transformer (pick your file)", unet_name=s.model_file,
                          weight_dtype="default"))
    clip = out(graph.add("DualCLIPLoader", "CLIP-L + T5-XXL",
                         clip_name1=s.text_encoders.get("clip_l", "clip_l.safetensors"),
                         clip_name2=s.text_encoders.get("t5xxl", "t5xxl_fp16.safetensors"), type="flux"))
    vae = out(graph.add("VAELoader", "VAE", vae_name=s.text_encoders.get("vae", "ae.safetensors")))
    model, clip = _lora(graph, s, model, clip)
    base, top = flux_shifts(s)
    model = out(graph.add("ModelSamplingFlux", "Shift", model=model, max_shift=top, base_shift=base, width=s.width,
                          height=s.height))
    latent = out(graph.add("EmptySD3LatentImage", "Size", width=s.width, height=s.height, batch_size=1))

    def guided(positive: list, index: int) -> list:
        return out(graph.add("FluxGuidance", f"Guidance {index + 1}", conditioning=positive, guidance=s.guidance))

    _draw(graph, s, model, clip, vae, latent, 1.0, guided if s.variant != "schnell" else None)
    return graph.nodes


def flux_shifts(s: ComfySettings) -> tuple[float, float]:
    """ModelSamplingFlux's (base_shift, max_shift) giving the mu diffusers' FluxPipeline used. Both shift time the
    same way (sigma = e^mu / (e^mu + 1/t - 1)) and interpolate mu linearly in the image's tokens, ComfyUI always
    between 256 and 4096 tokens: a scheduler with those ends keeps its base/max (the workflow then shifts right
    at any size); other ends give this size's mu as both; a static shift s (no dynamic shifting) is mu = ln s."""
    c = s.scheduler
    if not c.get("use_dynamic_shifting", True):
        mu = math.log(float(c.get("shift", 1.0)))
        return mu, mu
    base, top = float(c.get("base_shift", 0.5)), float(c.get("max_shift", 1.15))
    low, high = int(c.get("base_image_seq_len", 256)), int(c.get("max_image_seq_len", 4096))
    if (low, high) == (256, 4096):
        return base, top
    tokens = s.width * s.height / (8 * 8 * 2 * 2)  # as ComfyUI counts them: an 8x VAE, 2x2 patches
    mu = base + (top - base) * (tokens - low) / (high - low)
    return mu, mu


def sd3_graph(s: ComfySettings) -> dict[str, dict[str, Any]]:
    """SD 3.x: the checkpoint's MMDiT and VAE, CLIP-L + CLIP-G + T5-XXL from TripleCLIPLoader, the scheduler's
    fixed shift through ModelSamplingSD3, classifier-free guidance."""
    graph = Graph()
    loader = graph.add("CheckpointLoaderSimple", "SD 3 model (pick your file)", ckpt_name=s.model_file)
    names = {"clip_name1": s.text_encoders.get("clip_l", "clip_l.safetensors"),
             "clip_name2": s.text_encoders.get("clip_g", "clip_g.safetensors")}
    if s.uses_t5:
        clip = out(graph.add("TripleCLIPLoader", "CLIP-L + CLIP-G + T5-XXL", **names,
                             clip_name3=s.text_encoders.get("t5xxl", "t5xxl_fp16.safetensors")))
    else:  # trained without T5: its place stays empty, as in the run's samples
        clip = out(graph.add("DualCLIPLoader", "CLIP-L + CLIP-G (no T5, as trained)", **names, type="sd3"))
    model, clip = _lora(graph, s, out(loader, 0), clip)
    model = out(graph.add("ModelSamplingSD3", "Shift", model=model, shift=float(s.scheduler.get("shift", 3.0))))
    latent = out(graph.add("EmptySD3LatentImage", "Size", width=s.width, height=s.height, batch_size=1))
    _draw(graph, s, model, clip, out(loader, 2), latent, s.guidance)
    return graph.nodes
