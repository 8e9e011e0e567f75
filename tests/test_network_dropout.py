"""sd-scripts' network, rank and module dropout on peft's LoRA (network_dropout.py), against its LoRAModule's
forward written afresh here: active in training mode only, never in eval mode or the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from pydantic import ValidationError

from lora_core import network_dropout
from lora_core.config import TrainConfig
from lora_core.lora import network_args, sd_scripts_fields

BASE = dict(dataset_path="d", base_model="builtin:tiny-sd", output_path="o", trigger_words=["x"])
RANK, ALPHA = 4, 8


def adapted(conv: bool, **dropouts) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1) if conv else torch.nn.Linear(6, 6))
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"]), model)
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()  # peft starts B at zero: the LoRA would add nothing
    network_dropout.install(model, TrainConfig(**BASE, **dropouts))
    return model


def reference(model: torch.nn.Module, x: torch.Tensor, conv: bool, network=0.0, rank=0.0, module=0.0):
    """sd-scripts' LoRAModule.forward: org + up(drop(down(x))) * multiplier * scale."""
    layer = model[0]
    down, up = layer.lora_A["default"], layer.lora_B["default"]
    org = layer.base_layer(x)
    if module and torch.rand(1) < module:
        return org
    lx = down.forward(x)  # forward, not __call__: the hook under test stays out of its reference
    if network:
        lx = F.dropout(lx, p=network)
    scale = ALPHA / RANK
    if rank:
        mask = torch.rand((lx.size(0), RANK), device=lx.device) > rank
        mask = mask.unsqueeze(-1).unsqueeze(-1) if conv else mask.unsqueeze(1)
        lx = lx * mask
        scale = scale * (1.0 / (1.0 - rank))
    return org + up(lx) * scale


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("dropouts", [dict(rank_dropout=0.5), dict(network_dropout=0.3),
                                      dict(module_dropout=0.5), dict(network_dropout=0.2, rank_dropout=0.3)])
def test_each_dropout_is_sd_scripts_forward_in_training_and_absent_in_eval(conv, dropouts):
    model = adapted(conv, **dropouts)
    x = torch.randn(3, 6, 5, 5) if conv else torch.randn(3, 7, 6)  # a batch of images, or of token sequences
    options = {name.replace("_dropout", ""): value for name, value in dropouts.items()}
    for seed in range(4):  # module dropout: some forwards drop the module, some keep it
        torch.manual_seed(seed)
        got = model.train()(x)
        torch.manual_seed(seed)
        expected = reference(model, x, conv, **options)
        torch.testing.assert_close(got, expected)
    model.eval()
    torch.testing.assert_close(model(x), reference(model, x, conv))  # eval: the whole LoRA, nothing dropped


def test_rank_dropout_keeps_whole_ranks_per_sample_and_the_mean_update():
    model = adapted(False, rank_dropout=0.5).train()
    x = torch.randn(64, 5, 6)
    clean = reference(model, x, False) - model[0].base_layer(x)
    torch.manual_seed(1)
    dropped = model(x) - model[0].base_layer(x)
    # every sample's update is a 1/(1-p)-scaled sum over the ranks it kept: on average, the clean update
    assert (dropped.mean(0) - clean.mean(0)).abs().mean() < 0.5 * clean.abs().mean()
    assert not torch.allclose(dropped, clean)


def test_dropouts_leave_the_exported_weights_and_the_install_is_idempotent():
    plain, dropped = adapted(False), adapted(False, module_dropout=0.5, rank_dropout=0.2)
    assert network_dropout.install(dropped, TrainConfig(**BASE, rank_dropout=0.2)) == 0  # already hooked
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values(),
                                                 strict=True))


def test_dropouts_are_refused_where_they_do_not_apply_and_written_as_sd_scripts_does():
    with pytest.raises(ValidationError, match="rank_dropout"):
        TrainConfig(**BASE, rank_dropout=0.1, network_type="loha")
    with pytest.raises(ValidationError, match="network_dropout"):
        TrainConfig(**BASE, network_dropout=0.1, lora_dropout=0.1)
    chosen = TrainConfig(**BASE, network_dropout=0.1, rank_dropout=0.2, module_dropout=0.05)
    assert sd_scripts_fields(chosen, 4, False, 1, None)["ss_network_dropout"] == "0.1"
    assert network_args(chosen) == {"rank_dropout": "0.2", "module_dropout": "0.05"}
