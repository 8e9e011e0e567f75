"""An optimizer's state survives the checkpoint's safetensors round trip exactly, including bitsandbytes'
AdamW8bit, whose state holds a nested dict of quantisation tensors (saving it failed: "Could not infer dtype of
dict", so every adamw8bit run failed at its first checkpoint)."""

import pytest
import torch

from lora_core.checkpoint import _flatten_optimizer, _unflatten_optimizer


def two_steps(make, state: dict | None = None) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(256, 64))
    optimizer = make([param])
    for step in range(2):
        if step == 1 and state is not None:  # a resume: the saved state, loaded into a fresh optimizer
            param.data = state["param"].clone()
            optimizer = make([param])
            optimizer.load_state_dict(_unflatten_optimizer(*state["flat"]))
        param.grad = torch.randn(256, 64, generator=torch.Generator().manual_seed(step))
        optimizer.step()
        if step == 0 and state is None:
            tensors, groups = _flatten_optimizer(optimizer.state_dict())  # on the CPU these alias the live state,
            saved = {"param": param.data.clone(),  # which the next step changes: a copy, as the file on disk is
                     "flat": ({key: tensor.clone() for key, tensor in tensors.items()}, groups)}
    return param.detach().clone(), saved if state is None else state


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_a_resumed_step_from_the_saved_state_equals_the_straight_one(name):
    if name == "adamw8bit":
        bnb = pytest.importorskip("bitsandbytes")

        def make(params):
            return bnb.optim.AdamW8bit(params, lr=1e-2)
    else:
        def make(params):
            return torch.optim.AdamW(params, lr=1e-2)
    straight, saved = two_steps(make)
    tensors, _ = saved["flat"]
    assert all(torch.is_tensor(tensor) for tensor in tensors.values())
    if name == "adamw8bit":
        assert any("/" in key for key in tensors)  # the nested quantisation state, flattened
    resumed, _ = two_steps(make, saved)
    assert torch.equal(straight, resumed)
