"""The benchmark runs end to end on the tiny model and writes its JSON. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from bench.run import main

PHASE_KEYS = {"s_per_step", "images_per_s", "window_s_per_step", "memory", "step_memory", "wall_s"}


@pytest.mark.e2e
def test_bench_runs_all_phases_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["--model", "builtin:tiny-sd", "--resolution", "64", "--batch", "1", "--rank", "4", "--steps", "1",
                 "--windows", "2", "--warmup", "1", "--images", "2", "--image-size", "64", "--device", "cpu",
                 "--json", str(out), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    results = json.loads(out.read_text())
    assert {"machine", "settings", "phases", "ratios", "memory_estimate", "tflop_per_image"} <= set(results)
    assert list(results["phases"]) == ["reference", "trainer", "floor"]
    for name, phase in results["phases"].items():
        assert set(phase) >= PHASE_KEYS, name
        assert len(phase["window_s_per_step"]) == 2
        assert phase["s_per_step"] > 0 and phase["images_per_s"] > 0
        assert phase["step_memory"]["rss_gib"] > 0
    assert results["ratios"]["trainer_over_reference"] > 0
    assert results["ratios"]["floor_over_trainer"] > 0
    assert results["memory_estimate"]["total_gib"] > 0
    assert (tmp_path / "work" / "trainer-output" / "lora_final.safetensors").is_file()


@pytest.mark.e2e  # builds SD 1.5 and SDXL at full size (meta device): ~20 s
def test_flop_count_of_the_full_size_architectures():
    """The FLOP counts the GPU figures are quoted against (bench/README.md): 1.73 and 14.2 TFLOP per image."""
    from bench.flops import step_tflop_per_image

    sd15 = step_tflop_per_image("builtin:sd15-arch", 512, 16)
    sdxl = step_tflop_per_image("builtin:sdxl-arch", 1024, 16)
    assert sd15 is not None and abs(sd15["total"] - 1.725) < 0.01
    assert sdxl is not None and abs(sdxl["total"] - 14.19) < 0.05


@pytest.mark.e2e
def test_interleaved_run_times_every_phase_between_the_trainers_windows(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["--model", "builtin:tiny-sd", "--resolution", "64", "--batch", "1", "--rank", "4", "--steps", "1",
                 "--windows", "3", "--warmup", "1", "--images", "2", "--image-size", "64", "--device", "cpu",
                 "--interleave", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["settings"]["interleave"] is True
    assert list(results["phases"]) == ["reference", "trainer", "floor"]
    for name, phase in results["phases"].items():
        assert phase["interleaved"] is True, name
        assert len(phase["window_s_per_step"]) == 3, name
        assert "step_memory" not in phase  # every model is loaded at once: memory is for the whole run
    assert results["memory_all_phases"]["peak"]["rss_gib"] > 0
    assert results["ratios"]["trainer_over_reference"] > 0


def test_interleave_needs_the_trainer_phase(tmp_path):
    assert main(["--model", "builtin:tiny-sd", "--phases", "reference,floor", "--interleave",
                 "--work-dir", str(tmp_path)]) == 2


def test_trainer_windows_leave_out_what_ran_between_them():
    from bench.measure import windows_from_marks

    # windows end at 10, 20, 30; between them other phases ran for 6 s each (10-16, 20-26)
    timing = windows_from_marks([10.0, 20.0, 30.0], window_steps=2, warmup_windows=1, batch_size=1,
                                resumed=[16.0, 26.0, 30.0])
    assert timing.window_s_per_step == [2.0, 2.0]
    assert windows_from_marks([10.0, 20.0, 30.0], 2, 1, 1).window_s_per_step == [5.0, 5.0]
