"""A Stop while images are drawn (a run's samples, a sweep's cells) is answered between two denoising steps,
and no training step starts after it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import SHAPES_DATASET, tiny_config
from timeouts import within

from lora_core.configfile import parse_config
from lora_core.grid import run_job
from lora_core.training import train


@pytest.mark.e2e
def test_a_stop_while_drawing_is_answered_within_a_denoising_step(tmp_path: Path) -> None:
    checks: list[int] = []

    def should_stop() -> bool:  # no after steps 1 and 2; yes at the first check inside step 2's sample
        checks.append(len(checks))
        return len(checks) >= 3

    # 150 denoising steps a sample: drawing it whole before looking at the stop took longer than the test allows
    config = parse_config(tiny_config(SHAPES_DATASET, tmp_path / "run", steps=4, validation_steps=2,
                                      checkpoint_steps=100, sample_inference_steps=150))
    events = []
    umask = os.umask(0o022)  # the usual one: every output must get open()'s 0644, never mkstemp's 0600
    try:
        result = within(240, train, config, events.append, should_stop)
    finally:
        os.umask(umask)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in (tmp_path / "run").rglob("*")}
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode not in (0o644, 0o755)} == {}
    assert result.interrupted and result.step == 2 and len(checks) == 3
    assert max(event.step for event in events if event.type == "progress") == 2  # step 3 never started
    final = [event for event in events if event.type in ("complete", "interrupted", "error")]
    assert len(final) == 1 and final[0].step == 2 and Path(final[0].checkpoint_path).is_file()
    assert not any(event.type == "sample" for event in events)  # the abandoned image is not announced

    sweep = within(240, run_job, "sweep", tmp_path / "run", {"scales": [1.0, 0.0]}, lambda event: None,
                   lambda: True)
    assert sweep.type == "interrupted" and sweep.step == 0  # stopped inside the first cell, not after it
