"""EMA of the LoRA weights (lora_core/ema.py) and the post-hoc EMA of a run's checkpoints (posthoc_ema.py), on
builtin:toy-sd: the saved averages are the stated averages of the weights the run went through, the average of a
noisy run generalises better than its last weights, a resumed run continues the same average bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import ROOT, Tap, run_job_here, train_tapped
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core import ema, posthoc_ema
from lora_core.configfile import parse_config

pytestmark = pytest.mark.e2e

DECAY = 0.9
# A noisy run: one image a step at 10x the demo's learning rate. Measured (seeds 42 / 7 / 123): held-out loss of
# the raw final 0.071 / 0.070 / 0.065, of the EMA 0.051 / 0.066 / 0.050.
NOISY = dict(steps=60, batch_size=1, learning_rate=0.01, checkpoint_steps=20, validation_steps=1000,
             validation_images=3, sample_prompts=[], ema_decay=DECAY, seed=42)


def toy_config(output, **options) -> dict:
    data = json.loads((ROOT / "presets" / "demo-toy-cpu.json").read_text(encoding="utf-8"))
    data["dataset_path"], data["output_path"] = str(ROOT / "demo" / "dataset"), str(output)
    data["training_params"].update(options)
    return data


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The noisy run, with the weights after every optimizer step recorded: (run, [start, step 1, ...], folder,
    events)."""
    output = tmp_path_factory.mktemp("noisy") / "out"
    seen: dict = {}
    events: list = []

    def tap(run) -> None:
        seen["run"], seen["weights"] = run, [snapshot(run)]
        # the scheduler steps once after each applied optimizer step, before the EMA's update
        run.lr_scheduler = Tap(run.lr_scheduler, lambda args, result: seen["weights"].append(snapshot(run)), "step")

    train_tapped(parse_config(toy_config(output, **NOISY)), tap, emit=events.append)
    return seen["run"], seen["weights"], output, events


def snapshot(run) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().clone() for name, p in run.lora_params.items()}


def expected_average(weights: list[dict], steps: int, every: int = 1) -> dict[str, torch.Tensor]:
    """The EMA written out from its definition, in float64: start at the initial weights, then after each
    `every`-th step k-th update: d = min(decay, (1 + k) / (10 + k)), avg = d avg + (1 - d) w."""
    average = dict(weights[0])
    for updates, step in enumerate(range(every, steps + 1, every)):
        d = min(DECAY, (1 + updates) / (10 + updates))
        average = {name: d * average[name] + (1 - d) * weights[step][name] for name in average}
    return average


def file_of(run, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors (the family's names) of the model holding `weights`, by the run's own export."""
    saved = snapshot(run)
    with torch.no_grad():
        for name, p in run.lora_params.items():
            p.copy_(weights[name])
    state, _ = run.family.lora_file_contents(run.bare_unet, run.config, run.text_encoders)
    state = {key: t.detach().clone() for key, t in state.items()}
    with torch.no_grad():
        for name, p in run.lora_params.items():
            p.copy_(saved[name])
    return state


def assert_close(file: dict, expected: dict) -> None:
    assert file.keys() == expected.keys()
    worst = max(float((file[k].double() - expected[k].double()).abs().max()) for k in file)
    assert worst < 1e-6, worst


def test_the_saved_ema_is_the_average_of_the_recorded_weights(noisy):
    run, weights, output, _ = noisy
    assert len(weights) == 61
    final = expected_average(weights, 60)
    state = load_file(str(output / "checkpoints" / "state_step_60" / ema.STATE_FILE))
    assert int(state.pop(ema.UPDATES_KEY)) == 60
    assert_close({k: t.double() for k, t in state.items()}, final)
    assert_close(load_file(str(output / "lora_final.ema.safetensors")), file_of(run, final))
    assert_close(load_file(str(output / "checkpoints" / "lora_step_20.ema.safetensors")),
                 file_of(run, expected_average(weights, 20)))
    assert_close(load_file(str(output / "lora_final.safetensors")), file_of(run, weights[60]))  # raw stays raw
    with safe_open(str(output / "lora_final.ema.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert header["lora_studio.weights"] == "ema" and json.loads(header["lora_studio.ema"])["decay"] == DECAY


def test_the_ema_of_a_noisy_run_has_a_lower_held_out_loss_than_its_last_weights(noisy):
    run, weights, _, events = noisy
    raw = run.held_out.loss(run)
    averaged = expected_average(weights, 60)  # what lora_final.ema.safetensors holds (the test above)
    with torch.no_grad():
        for name, p in run.lora_params.items():
            p.copy_(averaged[name])
    smoothed = run.held_out.loss(run)
    with torch.no_grad():
        for name, p in run.lora_params.items():
            p.copy_(weights[60][name])
    assert smoothed < raw, (smoothed, raw)
    validation = [e for e in events if e.type == "validation"]  # the run reports both curves
    assert validation[0].ema_loss == validation[0].loss  # before the first step the EMA is the start
    assert validation[-1].step == 60 and validation[-1].loss == pytest.approx(raw, rel=1e-6)
    assert validation[-1].ema_loss == pytest.approx(smoothed, rel=1e-5)


def closed_form(betas: list[float]) -> list[float]:
    """Each file's weight in avg_0 = f_0, avg_i = b_i avg_(i-1) + (1 - b_i) f_i, multiplied out."""
    n = len(betas) + 1
    return [float(np.prod(betas)) if i == 0 else (1 - betas[i - 1]) * float(np.prod(betas[i:])) for i in range(n)]


@pytest.mark.parametrize("args, betas", [
    (["--beta", "0.8"], lambda n: [0.8] * n),
    (["--beta", "0.5", "--beta2", "0.9"], lambda n: [0.5, 0.9] if n == 2 else None),
    (["--sigma-rel", "0.15"], None),
])
def test_post_hoc_ema_writes_the_stated_weighted_average_of_the_checkpoints(noisy, tmp_path, args, betas):
    _, _, output, _ = noisy
    files = [output / "checkpoints" / "lora_step_20.safetensors", output / "checkpoints" / "lora_step_40.safetensors",
             output / "lora_final.safetensors"]
    target = tmp_path / "averaged.safetensors"
    assert posthoc_ema.main([str(output), *args, "--out", str(target)]) is None
    if betas is None:  # the power rule: gamma solves the cubic of Karras et al., beta_i = (1 - 1/i)^(gamma + 1)
        with safe_open(str(target), "pt") as handle:
            gamma = json.loads(handle.metadata()["lora_studio.post_hoc_ema"])["gamma"]
        t = 0.15 ** -2
        assert abs(gamma ** 3 + 7 * gamma ** 2 + (16 - t) * gamma + 12 - t) < 1e-6 and gamma > 0
        merge_betas = [(1 - 1 / i) ** (gamma + 1) for i in (1, 2)]
    else:
        merge_betas = betas(2)
    weights = closed_form(merge_betas)
    tensors = [load_file(str(path)) for path in files]
    result = load_file(str(target))
    for key, value in result.items():
        if key.endswith(".alpha"):
            assert torch.equal(value, tensors[0][key])
            continue
        expected = sum(w * t[key].double() for w, t in zip(weights, tensors, strict=True))
        assert float((value.double() - expected).abs().max()) < 1e-6, key
    with safe_open(str(target), "pt") as handle, safe_open(str(files[-1]), "pt") as last:
        header, last_header = handle.metadata(), last.metadata()
    made = json.loads(header["lora_studio.post_hoc_ema"])
    assert made["steps"] == [20, 40, 60] and made["weights"] == pytest.approx(weights, abs=1e-6)
    assert header["ss_network_dim"] == last_header["ss_network_dim"] and header["sshs_model_hash"] != \
        last_header["sshs_model_hash"]


def test_post_hoc_ema_needs_two_checkpoints(tmp_path):
    assert "at least 2" in posthoc_ema.main([str(tmp_path)])


RESUMED = dict(steps=8, batch_size=2, checkpoint_steps=100, validation_steps=1000, validation_images=None,
               sample_prompts=[], ema_decay=0.95, ema_update_every=2, ema_use_for_final=True)


def test_a_resumed_run_continues_the_same_ema_bit_for_bit(tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert run_job_here(parse_config(toy_config(whole, **RESUMED)))[0].type == "complete"
    stopped, _ = run_job_here(parse_config(toy_config(parted, **RESUMED)), stop_after_step=3)
    assert stopped.type == "interrupted" and (parted / "checkpoints" / "lora_step_3.ema.safetensors").is_file()
    assert run_job_here(parse_config(toy_config(parted, **RESUMED)), resume=True)[0].type == "complete"
    for name in ("checkpoints/state_step_8/ema.safetensors", "lora_final.safetensors", "lora_final.raw.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(parted / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with safe_open(str(whole / "lora_final.safetensors"), "pt") as handle:
        assert handle.metadata()["lora_studio.weights"] == "ema"


def test_ema_options_without_a_decay_are_refused_naming_the_fields(tmp_path):
    from lora_core.config import ConfigError

    with pytest.raises(ConfigError, match="ema_samples need an EMA; set ema_decay") as caught:
        parse_config(toy_config(tmp_path, ema_samples=True))
    assert {field for field, _ in caught.value.problems} == {"ema_decay", "ema_samples"}
