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


def test_compile_options_choose_how_the_trainer_and_each_floor_compile():
    from bench.run import floor_scope, parse_args

    assert parse_args([]).compile == "off" and parse_args(["--compile"]).compile == "on"
    assert parse_args(["--compile", "auto"]).compile == "auto"
    assert floor_scope(parse_args([])) == "eager"
    assert floor_scope(parse_args(["--compile"])) == "regional"  # the floor follows the trainer
    assert floor_scope(parse_args(["--compile", "--floor-compile", "whole"])) == "whole"
    assert floor_scope(parse_args([]), "floor_whole") == "whole"  # the phase name wins
    assert floor_scope(parse_args(["--compile"]), "floor_eager") == "eager"


def test_the_first_window_says_what_it_took_beyond_its_steps():
    from bench.measure import Timing, windows_from_marks

    timing = windows_from_marks([70.0, 80.0, 90.0], window_steps=5, warmup_windows=1, batch_size=1, first_start=0.0)
    assert timing.first_window_s == 70.0 and timing.first_window_extra_s == 60.0  # 5 steps of 2 s, + 60 s compiling
    assert timing.to_dict()["first_window_extra_s"] == 60.0
    assert "first_window_s" not in Timing([1.0], 1).to_dict()


def test_the_gpu_summary_shows_first_compile_times_and_the_compile_decision():
    from bench.collect import summary_lines

    phase = {"s_per_step": 0.08, "images_per_s": 12.5, "first_window_extra_s": 41.5,
             "step_memory": {"allocated_gib": 2.8, "reserved_gib": 3.0},
             "started": {"compile_unet": "regional", "cuda_graphs": True, "compile_reason": "compile_unet is on"}}
    lines = summary_lines({"sd15_b1_graphs": {"phases": {"trainer": phase}, "exit_code": "0"}}, {})
    text = "\n".join(lines)
    assert "41.5" in text and "compile_unet regional, cuda_graphs True: compile_unet is on" in text
    assert "sd15_b1_graphs trainer: s/step <= 0.09: 0.08 -> met" in text
    assert "sdxl_b1_regional trainer: s/step <= 0.3: not measured" in text


def test_processes_in_lockstep_take_turns_and_never_run_together(tmp_path):
    """bench.compare's turn-taking with stand-in processes: each writes its name three times per turn into one
    file; a turn that overlapped another would mix the names."""
    import sys

    from bench.compare import ROOT, Child, lockstep

    script = ("import sys, time\nfrom bench.turns import Turns\nturns = Turns.from_environment()\n"
              "for _ in range(3):\n    turns.wait()\n    for _ in range(3):\n"
              "        open(sys.argv[2], 'a').write(sys.argv[1]); time.sleep(0.01)\n")
    out = tmp_path / "turns.txt"
    children = [Child(name, ROOT, [sys.executable, "-c", script, name, str(out)], tmp_path / f"{name}.log")
                for name in "ab"]
    try:
        order = lockstep(children, timeout=60)
    finally:
        for child in children:
            child.process.wait(timeout=60)
            child.close()
    # three waits each: two turns of writing in between, one more after the last wait, then the end of file
    assert order == ["a", "b"] * 3
    assert out.read_text() == "aaabbb" * 3


@pytest.mark.e2e
def test_compare_runs_both_trees_in_turns_and_writes_the_figures(tmp_path):
    """The command's plumbing on the tiny model, against HEAD (its own engine exported): no timing is asserted."""
    from bench.compare import main as compare

    out = tmp_path / "compare.json"
    code = compare(["--against", "HEAD", "--setting", "tiny-sd", "--steps", "1", "--windows", "2",
                    "--bench-args", "--batch 1 --images 2 --image-size 64", "--json", str(out),
                    "--work-dir", str(tmp_path / "work")])
    assert code == 0
    results = json.loads(out.read_text())
    assert {"trees", "runs", "summary", "machine", "load_average", "load_average_end", "bench_args"} <= set(results)
    assert results["trees"]["against"]["path"] != results["trees"]["current"]["path"]
    run = results["runs"][0]
    assert run["exit_codes"] == {"current": 0, "against": 0}
    assert run["turns"] == 6  # 3 progress events each: both asked for a turn at every one
    assert run["against"]["engine"].startswith(str(tmp_path / "work"))
    for name in ("current", "against"):
        for clock in ("wall", "cpu"):
            figures = results["summary"][name][clock]
            assert set(figures["s_per_step"]) == {"trainer", "floor", "reference"}
            for key in ("trainer_over_floor", "trainer_over_reference"):
                assert figures[key]["n"] == 2 and figures[key]["median"] > 0
    for clock in ("wall", "cpu"):
        assert set(results["summary"]["change_percent"][clock]) >= {"trainer_over_floor", "trainer_over_reference"}
