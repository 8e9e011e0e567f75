"""lora_core/runrecord.py: one run's events folded into one state, and what a job's process adds to it."""

from __future__ import annotations

import json
from pathlib import Path

from lora_core.events import Checkpoint, Complete, Error, Interrupted, Progress, Started
from lora_core.runrecord import RunRecord, settle
from lora_core.runtail import RecordTail


def started(resumed_from: int | None = None) -> Started:
    return Started(total_steps=6, num_images=2, device="cpu", mixed_precision="no", model_family="sd15",
                   output_path="/o", resumed_from_step=resumed_from)


def progress(step: int, loss: float) -> Progress:
    return Progress(step=step, total_steps=6, loss=loss, percent=step * 100 / 6, lr=1e-4, it_per_s=1.0, eta_s=1.0,
                    epoch=0)


def test_a_resumed_run_keeps_its_history_replaces_replayed_steps_and_says_where_it_continued():
    record = RunRecord().add_all([
        started(), progress(1, 0.9), progress(2, 0.8), Checkpoint(step=2, path="/o/c2"), progress(3, 0.7),
        Interrupted(step=3, message="stopped by the user", checkpoint_path="/o/c3"),
        started(resumed_from=2), progress(3, 0.6), progress(4, 0.5)])
    assert record.state == "running" and record.message == "" and record.terminal is None
    assert record.loss_points == [(1, 0.9), (2, 0.8), (3, 0.6), (4, 0.5)]  # step 3 done again: its newest loss
    assert record.resumed_at == [2] and record.starts == 2
    assert [saved.step for saved in record.checkpoints] == [2, 3]
    record.add(Complete(final_path="/o/final", total_time=9.0, step=6))
    assert (record.state, record.percent, record.final_path) == ("complete", 100.0, "/o/final")


def test_what_the_process_adds_never_changes_the_record_itself():
    running = RunRecord().add_all([started(), progress(1, 0.9)])
    assert settle(running, alive=True).state == "running"
    assert settle(running, alive=True, stop_requested=True).state == "stopping"
    lost = settle(running, alive=False)
    assert lost.state == "stopped" and "no final event" in lost.message
    assert settle(running, alive=None).state == "running"  # a job.json without its pid yet: not known
    assert running.state == "running" and running.message == ""  # the copies changed, not the record
    assert settle(RunRecord(), alive=False).state == "failed"  # a process that ended before it started
    ended = RunRecord().add_all([started(), Error(message="boom", field="base_model")])
    assert settle(ended, alive=True).state == "stopping"  # the final event is written, the process still ends
    assert settle(ended, alive=False).state == "failed" and ended.error_field == "base_model"


def test_the_tail_reads_only_whole_lines_and_skips_what_is_not_an_event(tmp_path: Path):
    events = tmp_path / "events.jsonl"
    events.write_text(started().to_json() + "\n" + json.dumps({"type": "progress", "step": 1}) + "\n"
                      + progress(2, 0.5).to_json()[:30])
    tail = RecordTail(tmp_path)
    assert tail.update().starts == 1 and tail.record.step == 0  # a progress without its fields adds nothing
    with open(events, "a", encoding="utf-8") as handle:
        handle.write(progress(2, 0.5).to_json()[30:] + "\n")
    assert tail.update().step == 2 and tail.record.loss == 0.5
