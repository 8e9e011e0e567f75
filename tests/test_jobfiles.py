"""The server's own files of a job (OUTPUTS/.studio/jobs/<id>, studio/jobfiles.py) after the job: an ended job
found again by its id after a restart, only by an id the server makes; the folders kept and the ones removed
(studio/cleanup.py); the datasets a caption or doctor job works on kept from the uploads cleanup."""

from __future__ import annotations

import json

import pytest
from doctor_data import TRIGGER, make_set

from lora_core import files
from studio.jobfiles import jobs_folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


def test_an_ended_doctor_job_is_found_by_its_id_after_a_restart_and_only_by_an_id_the_server_makes(tmp_path):
    """The doctor's status endpoint (`doctor_status`) of a job that ended before the server restarted shows its
    findings, read from the job's folder; an id that is a path, or names another job's record, finds nothing."""
    from studio.doctor_job import DoctorJobPanel
    from studio.jobs import Studio

    folder = make_set(tmp_path / "set", 3)
    outputs = tmp_path / "outputs"
    first = Studio(outputs, devices=0)
    try:
        job_id = DoctorJobPanel(first, lambda path: None).start(str(folder), TRIGGER)[2]
        assert first.wait(job_id, timeout=60).state == "complete"
        before = DoctorJobPanel(first, lambda path: None).status(job_id)
    finally:
        first.shutdown(timeout=10)
    second = Studio(outputs, devices=0)
    try:
        assert job_id not in second.running()
        status = DoctorJobPanel(second, lambda path: None).status(job_id)
        assert status == before and status[0].startswith("3 image(s) checked") and status[1]
        assert second.view(job_id).state == "complete" and second.view(job_id).job_id == job_id

        own = jobs_folder(second.outputs_root) / job_id
        forged = jobs_folder(second.outputs_root) / "20250101-120000-doctor-abcdef"
        forged.mkdir()
        (forged / "job.json").write_text(json.dumps({"job_id": job_id, "kind": "doctor"}))  # another job's
        (forged / "events.jsonl").write_bytes((own / "events.jsonl").read_bytes())
        linked = jobs_folder(second.outputs_root) / "20250101-120000-doctor-fedcba"
        linked.symlink_to(own)
        for asked in (forged.name, linked.name, "20250101-120000-doctor-000000", f"../jobs/{job_id}", f"{job_id}/..",
                      "..", ".", job_id.upper(), str(own), f"{job_id}/events.jsonl", f" {job_id}", "no-such-job"):
            assert second.view(asked).state == "idle", asked
    finally:
        second.shutdown(timeout=10)


def test_every_temporary_of_a_killed_write_in_a_run_folder_is_swept_none_spared(tmp_path):
    """A run folder holds no file of the server's (its job files are in .studio/jobs), so nothing is spared."""
    for name in (".job.json.a1.tmp", ".lora_final.safetensors.b2.tmp"):
        (tmp_path / name).write_bytes(b"half")
    removed = files.remove_stale_temporaries(tmp_path)
    assert sorted(path.name for path in removed) == [".job.json.a1.tmp", ".lora_final.safetensors.b2.tmp"]
    with pytest.raises(TypeError):
        files.remove_stale_temporaries(tmp_path, spare=("job.json",))  # noqa  (no caller spares anything)


def test_an_upload_a_queued_or_running_caption_or_doctor_job_works_on_is_never_removed(tmp_path):
    """Uploads older than two days go unless something uses them: a training's data, and the dataset that a
    caption or doctor job waiting in the queue, or running (its process alive), works on; an ended one's goes."""
    import os
    import sys
    import time

    from helpers import wait_until

    from studio.cleanup import remove_unused
    from studio.launcher import JobProcess
    from studio.queue import queue_path

    outputs = tmp_path / "outputs"
    uploads = outputs / "uploads"
    for name in ("queued", "captioned", "checked", "ended"):
        (uploads / name).mkdir(parents=True)
        three_days_ago = time.time() - 3 * 86400
        os.utime(uploads / name, (three_days_ago, three_days_ago))
    queue_path(outputs).parent.mkdir(parents=True)
    queue_path(outputs).write_text(json.dumps([{"job_id": "20250101-120000-caption-abcdef", "kind": "caption",
                                                "output_path": str(jobs_folder(outputs) / "q"), "config": {},
                                                "args": [str(uploads / "queued"), "--overwrite"]}]))
    started = []
    for kind, name, script in (("caption", "captioned", "import time; time.sleep(60)"),
                               ("doctor", "checked", "import time; time.sleep(60)"), ("doctor", "ended", "pass")):
        started.append(JobProcess.start(jobs_folder(outputs) / name, [sys.executable, "-c", script],
                                        record={"job_id": name, "kind": kind, "target": str(uploads / name)}))
    try:
        wait_until(lambda: not started[2].alive(), what="the ended job's process")
        assert [path.name for path in remove_unused(uploads, outputs)] == ["ended"]
        assert sorted(path.name for path in uploads.iterdir()) == ["captioned", "checked", "queued"]
    finally:
        for job in started:
            job.kill()
            job.popen.wait(10)


HOLDER = """
import sys, time
from lora_core import runlock
runlock.take(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def _job(root, name: str, kind: str, days: float, *, target=None, ended: bool = True, record: bool = True):
    """A job folder as the server leaves it: job.json (its process gone: a pid now another process's), stderr.log,
    a tool's events.jsonl ending in its final event; every file last written `days` ago."""
    import os
    import time

    from lora_core.eventlog import EventLog
    from lora_core.events import Error

    folder = jobs_folder(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if record:
        (folder / "job.json").write_text(json.dumps({
            "job_id": name, "kind": kind, "target": str(target or root / "data"), "pid": os.getpid(),
            "start_time": 1.0, "token": "t", "started_at": "2025-01-01T00:00:00.000+00:00"}))
    (folder / "stderr.log").write_text("--- the command\n")
    if ended and kind != "train":
        log = EventLog(folder / "events.jsonl")
        log(Error(message="done"))
        log.close()
    when = time.time() - days * 86400
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (when, when))
    return folder


def test_old_job_folders_go_and_every_one_a_live_queued_or_listed_job_reads_stays(tmp_path):
    """The retention rule (studio/cleanup.py, docs/webui.md): ended tool jobs' folders for 7 days and the newest
    200; a training's as long as its run; one whose job never started for a day, or until its run records the
    failure; never one whose job is alive, queued or running on this server. The Runs list is unchanged."""
    import subprocess
    import sys
    import time

    from lora_core.eventlog import EventLog
    from lora_core.events import Error
    from studio.cleanup import prune_jobs
    from studio.queue import queue_path
    from studio.runs import list_runs

    root = (tmp_path / "outputs").resolve()
    old_tool = _job(root, "old-grid", "grid", 8)
    recent = [_job(root, f"doctor-{i:03d}", "doctor", i / 1440) for i in range(200)]  # a minute apart
    yesterday = _job(root, "score-yesterday", "score", 1)  # the 201st newest ended tool job
    kept = {_job(root, "running-here", "caption", 30), _job(root, "queued", "train", 2, record=False)}
    queue_path(root).write_text(json.dumps([{"job_id": "queued", "output_path": str(root / "next"), "config": {}}]))
    held = _job(root, "held", "caption", 30, ended=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(held)], stdout=subprocess.PIPE, text=True)
    (root / "listed").mkdir()
    (root / "listed" / "events.jsonl").write_text("")  # a run that never wrote an event: listed by its job
    listed = _job(root, "listed-train", "train", 30, target=root / "listed")
    gone = _job(root, "gone-train", "train", 3, target=root / "gone")  # its run deleted by hand
    young, stale, refused = (_job(root, name, "train", days, record=False)
                             for name, days in (("young", 0.1), ("stale", 1.5), ("refused-resume", 0.1)))
    (refused / "job_config.json").write_text(json.dumps({"output_path": str(root / "listed")}))
    log = EventLog(root / "listed" / "events.jsonl")
    log(Error(message="the train job could not start: the model cannot be loaded"))  # after the job folder
    log.close()
    before = [row.to_dict() for row in list_runs(root)]
    try:
        assert holder.stdout.readline().strip() == "held"
        removed = prune_jobs(root, protected=["running-here"])
    finally:
        holder.kill()
        holder.wait()
    assert sorted(path.name for path in removed) == sorted(
        [old_tool.name, yesterday.name, gone.name, stale.name, refused.name])
    left = {path.name for path in jobs_folder(root).iterdir()}
    assert left == {path.name for path in [*kept, held, listed, young, *recent]}
    assert [row.to_dict() for row in list_runs(root)] == before
    assert {row["id"]: row["state"] for row in before} == {"next": "queued", "listed": "failed"}
    later = prune_jobs(root, protected=["running-here"], now=time.time() + 8 * 86400)  # a week on
    assert sorted(path.name for path in later) == sorted(["held", "young", *(path.name for path in recent)])


def test_a_server_prunes_the_job_folders_as_it_starts_and_then_at_most_hourly(tmp_path):
    import time

    from helpers import wait_until

    from studio.cleanup import prune_jobs_hourly
    from studio.jobs import Studio

    root = (tmp_path / "outputs").resolve()
    old, new = _job(root, "old-doctor", "doctor", 8), _job(root, "new-doctor", "doctor", 6.99)
    studio = Studio(root, devices=0)
    try:
        wait_until(lambda: not old.exists(), 30, what="the prune at the server's start")
        assert new.is_dir() and studio.running() == []
        assert prune_jobs_hourly(root, list, now=time.time() + 3500) is None  # pruned less than an hour ago
        later = prune_jobs_hourly(root, list, now=time.time() + 3700)  # an hour on: now 7 days old
        later.join(30)
        assert not new.exists()
        assert prune_jobs_hourly(root, list, now=time.time() + 3800) is None
    finally:
        studio.shutdown(timeout=10)


def test_a_long_run_that_completed_before_a_restart_stays_complete_and_is_found_by_its_jobs_id(tmp_path):
    """Its events are past what one look reads (1 MiB): the restarted server reads on to their end, so it
    neither takes the run for one whose process died without a final event (writing an error after its
    `complete`) nor misses the job when asked by its id."""
    from lora_core.eventlog import read_events
    from lora_core.events import Complete, Progress, Started
    from studio.jobs import Studio

    root = (tmp_path / "outputs").resolve()
    run, steps = root / "long", 12_000
    run.mkdir(parents=True)
    lines = [Started(total_steps=steps, num_images=1, device="cpu", mixed_precision="no", model_family="sd15",
                     output_path=str(run)).to_json()]
    lines += [Progress(step=step, total_steps=steps, loss=0.5, percent=100 * step / steps, lr=1e-4, it_per_s=9.0,
                       eta_s=0.0, epoch=0).to_json() for step in range(1, steps + 1)]
    lines.append(Complete(final_path=str(run / "lora_final.safetensors"), total_time=9.0, step=steps).to_json())
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")
    assert (run / "events.jsonl").stat().st_size > 2 * 1024**2
    job = _job(root, "20250101-120000-abcdef", "train", 0, target=run)
    studio = Studio(root, devices=0)
    try:
        view = studio.view(job.name)
        assert (view.state, view.step, view.message) == ("complete", steps, "")
        assert [event.type for event in read_events(run / "events.jsonl")][-2:] == ["progress", "complete"]
    finally:
        studio.shutdown(timeout=10)
