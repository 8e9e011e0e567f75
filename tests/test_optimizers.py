"""The optimizers maintained outside torch (Lion, Lion 8-bit, schedule-free AdamW, CAME) and LoRA+: each lowers
tiny-sd's held-out loss in a few steps, their state survives a checkpoint exactly, schedule-free AdamW's samples,
validation and file use its average while a resumed run stays bit-identical, and LoRA+ gives the up matrices
their own rate."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import SHAPES_DATASET, tiny_config
from pydantic import ValidationError
from safetensors.torch import load_file, safe_open
from test_optimizer_state import two_steps

from lora_core import memory, optim, param_groups
from lora_core.config import TrainConfig
from lora_core.configfile import parse_config
from lora_core.training import train

BASE = dict(dataset_path="d", base_model="builtin:tiny-sd", output_path="o", trigger_words=["x"])
# a learning rate each can show progress with in six tiny steps (Lion's sign steps are the largest)
RATES = {"lion": 2e-3, "adamw_schedulefree": 1e-2, "came": 5e-3}
STEPS, CHECKPOINT = 6, 3


def options(optimizer: str, held_out) -> dict:
    return dict(steps=STEPS, optimizer=optimizer, learning_rate=RATES[optimizer], checkpoint_steps=CHECKPOINT,
                validation_steps=1000, validation_dataset_path=str(held_out))


def run(config: dict, resume: bool = False, stop_at: int | None = None):
    events = []

    def should_stop() -> bool:
        return stop_at is not None and any(e.type == "progress" and e.step >= stop_at for e in events)

    return train(parse_config(config), events.append, should_stop, resume=resume), events


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The training images again, from another folder: the held-out loss then measures how well they are fit."""
    folder = tmp_path_factory.mktemp("held_out") / "shapes"
    shutil.copytree(SHAPES_DATASET, folder)
    return folder


@pytest.fixture(scope="module", params=sorted(RATES))
def trained(request, tmp_path_factory, held_out):
    folder = tmp_path_factory.mktemp(request.param)
    result, events = run(tiny_config(SHAPES_DATASET, folder / "out", **options(request.param, held_out)))
    return request.param, result, events


@pytest.mark.e2e
def test_each_optimizer_lowers_the_held_out_loss_and_is_named_in_the_file(trained):
    name, result, events = trained
    losses = [e.loss for e in events if e.type == "validation"]
    assert len(losses) == 2 and losses[1] < losses[0] - 1e-3, losses  # before the first step and after the last
    with safe_open(str(result.final_path), "pt") as handle:
        assert handle.metadata()["ss_optimizer"] == optim_name(name)


def optim_name(name: str) -> str:
    return {"lion": "lion_pytorch.Lion", "adamw_schedulefree": "schedulefree.AdamWScheduleFree",
            "came": "came_pytorch.CAME"}[name]


@pytest.mark.e2e
def test_a_stopped_and_resumed_schedule_free_run_is_bit_identical(trained, tmp_path, held_out):
    name, result, _ = trained
    if name != "adamw_schedulefree":
        pytest.skip("the schedule-free run is the one whose weights switch between two points")
    config = tiny_config(SHAPES_DATASET, tmp_path / "out", **options(name, held_out))
    first, _ = run(config, stop_at=CHECKPOINT - 1)  # stops after step 2 (a state of its own), samples nothing
    assert first.interrupted
    second, events = run(config, resume=True)
    assert events[0].resumed_from_step == CHECKPOINT - 1
    straight, resumed = load_file(str(result.final_path)), load_file(str(second.final_path))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_schedule_free_weights_are_the_average_inside_the_block_and_exactly_back_after_it():
    config = TrainConfig(**BASE, optimizer="adamw_schedulefree")
    param = torch.nn.Parameter(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))
    optimizer = optim.make_optimizer(config, [{"params": [param], "lr": 1e-2}], torch.device("cpu"))
    for step in range(3):
        param.grad = torch.randn(32, 8, generator=torch.Generator().manual_seed(step + 1))
        optimizer.step()
    training_point = param.detach().clone()
    z = optimizer.state[param]["z"].clone()
    with optim.averaged_weights(config, optimizer):
        with optim.averaged_weights(config, optimizer):  # reentrant: an export inside a checkpoint
            average = param.detach().clone()
        assert torch.equal(param, average)
    assert torch.equal(param, training_point) and optimizer.param_groups[0]["train_mode"]
    beta = optimizer.param_groups[0]["betas"][0]
    # y = (1 - beta) z + beta x, so x = (y - (1 - beta) z) / beta
    assert torch.allclose(average, (training_point - (1 - beta) * z) / beta, atol=1e-5)
    assert not torch.allclose(average, training_point)


@pytest.mark.parametrize("name", ["lion", "lion8bit", "came", "adamw_schedulefree"])
def test_each_new_optimizers_state_survives_a_checkpoint_exactly(name):
    config = TrainConfig(**BASE, optimizer=name)

    def make(params):
        return optim.make_optimizer(config, [{"params": params, "lr": 1e-3}], torch.device("cpu"))

    straight, saved = two_steps(make)
    resumed, _ = two_steps(make, saved)
    assert torch.equal(straight, resumed)
    if name == "lion8bit":  # 256 x 64 is above bitsandbytes' 4096-element floor: its state is 8-bit
        optimizer = make([torch.nn.Parameter(torch.zeros(256, 64))])
        optimizer.param_groups[0]["params"][0].grad = torch.ones(256, 64)
        optimizer.step()
        assert next(iter(optimizer.state.values()))["state1"].dtype == torch.uint8


def test_lion_takes_its_own_rate_and_decay_only_where_they_are_left_at_adamws():
    lion = TrainConfig(**BASE, optimizer="lion")
    assert (lion.learning_rate, lion.adam_weight_decay) == (3e-5, 3e-2)
    chosen = TrainConfig(**BASE, optimizer="lion", learning_rate=5e-5, adam_weight_decay=0.1)
    assert (chosen.learning_rate, chosen.adam_weight_decay) == (5e-5, 0.1)
    assert TrainConfig(**lion.model_dump()).learning_rate == 3e-5  # its resolved config reads back the same


def test_schedule_free_refuses_a_schedule_and_paged_lion_the_cpu():
    with pytest.raises(ValidationError, match="lr_scheduler"):
        TrainConfig(**BASE, optimizer="adamw_schedulefree", lr_scheduler="cosine")
    with pytest.raises(memory.LowMemoryOptimizerError, match="lion8bit"):
        memory.check_device(TrainConfig(**BASE, optimizer="paged_lion8bit"), "cpu")


def test_loraplus_gives_the_up_matrices_ratio_times_the_rate():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 8))
    for module in (model, encoder):
        module.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), module)
    params = [p for p in model.parameters() if p.requires_grad]
    text = [p for p in encoder.parameters() if p.requires_grad]
    config = TrainConfig(**BASE, learning_rate=1e-4, text_encoder_lr=1e-5, loraplus_lr_ratio=16)
    groups = param_groups.optimizer_groups(config, params, text, [model, encoder])
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 1e-5, 16e-5])
    names = {id(p): n for m in (model, encoder) for n, p in m.named_parameters()}
    assert [{names[id(p)].split(".")[1] for p in g["params"]} for g in groups] == [{"lora_A"}, {"lora_B"}] * 2
    plain = param_groups.optimizer_groups(TrainConfig(**BASE), params, text, [model, encoder])
    assert [len(g["params"]) for g in plain] == [len(params), len(text)]
    with pytest.raises(ValidationError, match="loraplus_lr_ratio"):
        TrainConfig(**BASE, loraplus_lr_ratio=4, network_type="loha")
