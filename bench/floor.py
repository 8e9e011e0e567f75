"""The floor: the UNet's forward, backward and optimizer step alone, on pre-made latents and embeddings.

The UNet is prepared exactly as the trainer prepares it (`lora_core.setup.prepare_unet`: dtype, fp32 LoRA,
channels-last, checkpointing) and stepped with the trainer's optimizer (`lora_core.optim`). Nothing else runs
(no gradient clipping, no data, no noise), so the gap to the trainer is everything the trainer adds around the
step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import compat
from lora_core import hardware, optim
from lora_core.config import TrainConfig


class FloorLoop:
    def __init__(self, unet, config: TrainConfig, device: torch.device, *, scope: str = "eager",
                 compile_mode: str | None = None, sync_per_step: bool = False, contiguous: bool = False,
                 text_tokens: int = 77):
        """`scope` eager, regional (the repeated blocks, as the trainer compiles) or whole (the whole UNet), with
        torch.compile's `compile_mode` (reduce-overhead: CUDA graphs), whatever `config.compile_unet` says;
        `sync_per_step` reads the loss back every step, to price one host-device sync; `contiguous` undoes
        prepare_unet's channels-last layout, to price it."""
        precision = hardware.resolve_precision(config, device)
        self.dtype = hardware.weight_dtype(precision)
        self.device, self.autocast = device, precision != "no"
        prepare_unet = compat.prepare_unet()
        self.params = prepare_unet(unet, config, device, self.dtype, config.gradient_checkpointing == "on")
        if contiguous:
            unet.to(memory_format=torch.contiguous_format)
        self.optimizer = optim.make_optimizer(config, [{"params": self.params, "lr": config.learning_rate}], device)
        self.sync_per_step = sync_per_step
        if scope == "eager":
            self.forward = unet
        elif compile_mode in (None, "default", "reduce-overhead"):
            # imported here: engines before regional compilation (python -m bench compare) have no such module
            from lora_core.compile import CompileDecision, compile_unet

            graphs = compile_mode == "reduce-overhead"
            self.forward = compile_unet(unet, CompileDecision(True, graphs, "benchmark"), scope)
        else:  # another torch.compile mode (max-autotune, ...): the whole model, as torch.compile takes it
            self.forward = torch.compile(unet, mode=compile_mode)

        generator = torch.Generator().manual_seed(config.seed)
        batch, size = config.batch_size, config.resolution // 8

        def made(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device, dtype)

        self.latents = made(batch, unet.config.in_channels, size, size)
        self.target = made(batch, unet.config.out_channels, size, size)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        self.conditioning: dict = {"encoder_hidden_states": made(batch, text_tokens, unet.config.cross_attention_dim,
                                                                 dtype=self.dtype)}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            self.conditioning["added_cond_kwargs"] = {"text_embeds": made(batch, pooled, dtype=self.dtype),
                                                      "time_ids": made(batch, 6, dtype=self.dtype)}

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            prediction = self.forward(self.latents, self.timesteps, **self.conditioning).sample
        loss = F.mse_loss(prediction.float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync_per_step:
            loss.item()
