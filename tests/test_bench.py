"""The benchmark runs end to end on the tiny model and writes its JSON. No timing is asserted."""

from __future__ import annotations

import json

from bench.run import main

PHASE_KEYS = {"s_per_step", "images_per_s", "window_s_per_step", "memory", "step_memory", "wall_s"}


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


def test_flop_count_of_the_full_size_architectures():
    """The FLOP counts the GPU figures are quoted against (bench/README.md): 1.73 and 14.2 TFLOP per image."""
    from bench.flops import step_tflop_per_image

    sd15 = step_tflop_per_image("builtin:sd15-arch", 512, 16)
    sdxl = step_tflop_per_image("builtin:sdxl-arch", 1024, 16)
    assert sd15 is not None and abs(sd15["total"] - 1.725) < 0.01
    assert sdxl is not None and abs(sdxl["total"] - 14.19) < 0.05
