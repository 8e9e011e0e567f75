"""A job is a process: its command, its run folder's files, finding it again, and how an unreported end is told."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from helpers import tiny_config, wait_until

from lora_core.configfile import parse_config
from lora_core.eventlog import read_events
from lora_core.events import (
    EVENT_TYPES,
    CaptionComplete,
    CaptionProgress,
    CaptionStarted,
    Checkpoint,
    Complete,
    ConceptBleed,
    Dataset,
    DoctorComplete,
    DoctorProgress,
    Error,
    GridComplete,
    GridProgress,
    Interrupted,
    Overfitting,
    Progress,
    RunWarning,
    Sample,
    ScoreComplete,
    ScoreProgress,
    Started,
    ValidationLoss,
    ValidationReport,
    parse_event,
)
from lora_core.runtail import RecordTail
from studio import launcher
from studio.jobfiles import JobFiles
from studio.launcher import JobProcess, launch_command, record_lost


def test_one_device_runs_the_engine_and_several_go_through_accelerate_launch():
    assert launch_command("run.json", 1, python="py") == ["py", "-m", "lora_core", "train", "--config", "run.json"]
    command = launch_command("run.json", 4, extra_args=["--resume"], python="py")
    assert command[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4" and "--multi_gpu" in command
    assert command[command.index("--main_process_port") + 1] == "0"  # a free port: two jobs never clash
    assert command[-6:] == ["-m", "lora_core", "train", "--config", "run.json", "--resume"]


def test_each_job_sees_only_its_own_gpus_and_cpu_processes_use_gloo(tmp_path):
    config = parse_config(tiny_config(tmp_path, tmp_path / "out"))
    env = launcher.job_environment(config, 1, [1], base={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and "ACCELERATE_USE_CPU" not in env
    assert launcher.job_environment(config, 2, [0, 1], base={})["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert launcher.job_environment(config, 2, [], base={})["ACCELERATE_USE_CPU"] == "true"


def test_every_event_reads_back_from_its_json_line():
    events = [Started(total_steps=5, num_images=3, device="cuda:0", mixed_precision="bf16", model_family="SDXL",
                      output_path="out", num_processes=4),
              Progress(step=1, total_steps=5, loss=None, percent=20.0, lr=1e-4, it_per_s=0.0, eta_s=-1.0, epoch=0),
              Checkpoint(step=2, path="c"), Sample(step=2, image_path="s.png", prompt="p"),
              Complete(final_path="f", total_time=1.5, step=5), Error(message="m", field="seed"),
              Interrupted(step=3, message="m", checkpoint_path=None),
              Dataset(num_images=3, num_captioned=2, refused=[{"file": "a.png", "reason": "r"}], num_refused=1,
                      ignored=["n.md"], num_ignored=1, warnings=["w"]),
              RunWarning(message="m", step=2, field="output_path"),
              GridProgress(kind="grid", done=1, total=4, row="step 2", column="p"),
              GridComplete(kind="sweep", path="sweep.png", width=64, height=32, total_time=1.0),
              ValidationLoss(step=4, loss=0.25),
              ConceptBleed(step=5, rows=[{"concept": "a", "from_concept": "b", "bleed": 0.1}]),
              Overfitting(step=6, reason="heldout_rising", message="m", best_step=4, best_path="b.safetensors"),
              ScoreProgress(done=1, total=2, label="step 4"),
              ScoreComplete(path="scores.json", recommendation="step 4 at 1.0", total_time=2.0),
              CaptionStarted(folder="d", model="m", device="cpu", total=3, kept=1, num_refused=0),
              CaptionProgress(done=1, total=3, file="a.png", status="written", caption="sks, a dog"),
              CaptionComplete(folder="d", written=2, kept=1, refused=[{"file": "b.png", "reason": "r"}],
                              num_refused=1, device="cpu", total_time=1.0),
              DoctorProgress(done=1, total=3, folder="d"),
              DoctorComplete(path="findings.json", folders=["d"], num_images=3, num_findings=1,
                             severities={"warning": 1}, total_time=0.5),
              ValidationReport(ok=False, problems=[{"field": "seed", "message": "m"}], details={"total_steps": 5})]
    assert {event.type for event in events} == set(EVENT_TYPES)
    assert [parse_event(event.to_json()) for event in events] == events
    assert json.loads(events[-1].to_json())["total_steps"] == 5  # the report's details sit at the top level


def fake_job(tmp_path: Path, monkeypatch, script: str) -> JobProcess:
    """A job whose process runs `script` instead of the engine (launch_command is what JobProcess runs)."""
    monkeypatch.setattr(launcher, "launch_command", lambda *args, **kwargs: [sys.executable, "-c",
                                                                             textwrap.dedent(script)])
    config = parse_config(tiny_config(tmp_path, tmp_path / "run"))  # the job's own files: in tmp_path / "job"
    (tmp_path / "run").mkdir()  # as the page's Studio makes it before it starts the job
    return JobProcess.start(tmp_path / "job", launcher.train_command(tmp_path / "job", config), config,
                            record={"job_id": "j1", "kind": "train", "target": str(tmp_path / "run")})


def test_a_process_that_exits_without_a_result_ends_in_one_error_with_its_stderr(tmp_path, monkeypatch):
    started = Started(total_steps=5, num_images=3, device="cpu", mixed_precision="no", model_family="SD 1.x",
                      output_path=str(tmp_path / "run"))
    job = fake_job(tmp_path, monkeypatch, f"""
        import sys
        with open({str(tmp_path / "run" / "events.jsonl")!r}, "a") as log:
            print({started.to_json()!r}, file=log)
        print("CUDA error: an illegal memory access", file=sys.stderr)
        sys.exit(3)
    """)
    recorded = json.loads((tmp_path / "job" / "job.json").read_text())
    assert recorded["pid"] == job.pid and recorded["job_id"] == "j1" and recorded["start_time"] > 0
    assert (tmp_path / "job" / "job_config.json").is_file() and (tmp_path / "job" / "stderr.log").is_file()
    wait_until(lambda: not job.alive(), what="the process to exit")
    assert RecordTail(job.events_folder).update().terminal is None
    error = record_lost(job)
    assert "exited with code 3" in error.message and "illegal memory access" in error.message
    assert [event.type for event in read_events(tmp_path / "run" / "events.jsonl")] == ["started", "error"]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["events.jsonl"]  # the run's, only
    record = RecordTail(tmp_path / "run").update()
    assert record.terminal == error and record.state == "failed"  # every later reader sees the run as failed


def test_a_killed_job_is_told_by_its_signal_and_a_later_process_finds_it_by_pid_and_start_time(tmp_path,
                                                                                                 monkeypatch):
    job = fake_job(tmp_path, monkeypatch, """
        import sys, time
        print("loading the model", file=sys.stderr, flush=True)
        time.sleep(120)
    """)
    wait_until(lambda: "loading the model" in "".join(JobFiles(job.folder).stderr_tail()), what="the child's stderr")
    found = JobProcess.attach(job.folder)  # what a restarted server sees
    assert found is not None and found.popen is None and found.alive()
    assert found.start_time == job.start_time
    reused = JobProcess(found.folder, found.pid, found.start_time - 100)  # the same pid, another process
    assert not reused.alive()
    job.kill()
    wait_until(lambda: not job.alive(), what="the kill")
    assert not found.alive()
    error = record_lost(job)
    assert "killed by signal 9 (SIGKILL)" in error.message and "loading the model" in error.message
    assert "exit status is unknown" in found.describe_exit()  # not its child: how it ended is not known


def test_a_lost_tool_job_is_named_by_what_it_was_not_called_a_training(tmp_path):
    """A doctor killed by SIGKILL: its one error (in its own job folder's events) names the dataset doctor; a
    later server, which cannot know the exit status, names each kind the same way."""
    script = "import sys, time; print('measuring', file=sys.stderr, flush=True); time.sleep(60)"
    job = JobProcess.start(tmp_path / "job", [sys.executable, "-c", script],
                           record={"job_id": "j2", "kind": "doctor", "target": str(tmp_path)})
    wait_until(lambda: "measuring" in "".join(JobFiles(job.folder).stderr_tail()), what="the child's stderr")
    job.kill()
    wait_until(lambda: not job.alive(), what="the kill")
    error = record_lost(job)
    assert error.message.startswith("the dataset doctor's process was killed by signal 9 (SIGKILL)")
    assert "training" not in error.message and "measuring" in error.message
    assert [event.type for event in read_events(tmp_path / "job" / "events.jsonl")] == ["error"]
    for kind, words in (("grid", "the grid's process"), ("score", "the scoring job's process"),
                        ("caption", "the captioning job's process"), ("train", "the training process")):
        later = JobProcess(tmp_path / "job", job.pid, job.start_time, {"kind": kind})
        assert later.describe_exit().startswith(f"{words} (pid {job.pid}) ended without a final event")
    assert JobProcess(tmp_path, 1, 0.0, {}).describe_exit().startswith("the training process")  # an older record
