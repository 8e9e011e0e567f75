"""One description of a page job and the one way it becomes a process, whatever its kind.

A job is a `QueuedJob` (studio/queue.py): its kind, its arguments, its job folder (`output_path`) and how many
devices it needs. Every kind runs `python -m lora_core KIND ...` through the same command wrapper (the engine
writes its own events, holds its folder's lock, ends with exactly one final event, stops on SIGTERM) and is
started by the same `JobProcess.start` (studio/launcher.py), queued by the same `Studio.submit_job`, and
followed, stopped and adopted after a restart the same way (studio/jobs.py):

    kind      events.jsonl written to         target (the folder it works on)
    train     the run folder (run_job)        the run folder (written: exclusive lock)
    grid      its job folder                  the run folder (read: shared lock)
    sweep     its job folder                  the run folder (read: shared lock)
    score     its job folder                  the run folder (read: shared lock; scores.json)
    caption   its job folder                  the dataset folder (its .txt files written)
    doctor    its job folder (findings.json)  the dataset folder (read)        no device

Every kind's job folder, the server's own files of the job (job.json, stderr.log, a training's
job_config.json; studio/jobfiles.py), is OUTPUTS/.studio/jobs/<id>: nothing of the server's is in a run folder.
A kind in `DEVICELESS` never touches a GPU (the dataset doctor reads images with Pillow and numpy on the CPU):
it starts as soon as it is queued, beside whatever holds the devices, instead of waiting behind a training
run for an hour, and holds no device itself. One job at a time works on a folder: a dataset being captioned
is busy for the doctor and the other way round (`check_free`).

Nothing here imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_core import runlock
from lora_core.config import TrainConfig
from lora_core.events import Error
from lora_core.runtail import RecordTail
from studio.jobfiles import JOB_FILE, jobs_folder
from studio.launcher import JobProcess, record_lost, tool_command, train_command
from studio.queue import QueuedJob

log = logging.getLogger("studio.pipeline")
DRAWN = ("grid", "sweep", "score")  # read a run's saved LoRAs: the run folder is their first argument
DEVICELESS = ("doctor",)  # kinds that use no device: started at once, never queued behind one that does


class BusyError(RuntimeError):
    """The folder already has a queued or running job, another process holds it, or the queue is full."""


def tool_jobs_folder(outputs_root: Path) -> Path:
    return jobs_folder(outputs_root)


def job_folder(outputs_root: Path, job: QueuedJob) -> Path:
    """Where the server keeps a job's own files: a tool's `output_path`, a training's folder named by its id."""
    return jobs_folder(outputs_root) / job.job_id if job.kind == "train" else Path(job.output_path)


def target_of(job: QueuedJob) -> Path:
    """The folder a job works on: a training's run folder, a grid's run, a caption or doctor job's dataset."""
    return Path(job.output_path if job.kind == "train" else job.args[0]).resolve()


def job_command(job: QueuedJob, folder: Path) -> tuple[list[str], TrainConfig | None]:
    """The command that runs `job` (its files in its job `folder`) and the config whose device it runs on
    (None: the job's own options)."""
    if job.kind == "train":
        config = job.train_config()
        return train_command(folder, config, job.processes, job.resume), config
    config = None
    if job.kind in DRAWN:
        from lora_core.grid import read_run  # torch-free: reads the run's config file

        _, config = read_run(job.args[0])
    return tool_command([job.kind, *job.args]), config


def queue_row(job: QueuedJob, position: int) -> dict[str, Any]:
    """What the page shows of a queued job: job_id, position, output_path, resume, processes, queued_at, kind,
    its model and steps, and target (the folder it works on: a grid's or score's run)."""
    return {"job_id": job.job_id, "position": position, "output_path": job.output_path, "resume": job.resume,
            "target": str(target_of(job)), "processes": job.processes, "queued_at": job.queued_at, "kind": job.kind,
            "base_model": job.config.get("base_model"), "steps": job.config.get("training_params", {}).get("steps")}


def check_free(target: Path, kind: str, busy: dict[Path, set[str]]) -> None:
    """BusyError when `kind` may not work on `target` now: a job of this server queued or running for it
    (a training excludes everything; grids and sweeps of one run may share it; one caption or doctor job a
    dataset),
    or another process holding its lock (a CLI run, a second server)."""
    kinds = busy.get(target, set())
    reading = kind in DRAWN
    if kinds and not (reading and kinds <= set(DRAWN)):
        what = ("training, or waiting to" if "train" in kinds else "a grid, sweep or score queued or drawing"
                if kinds <= set(DRAWN) else f"a {'/'.join(sorted(kinds))} job")
        raise BusyError(f"{target} already has a queued or running job ({what}); start this once that has "
                        "ended, or stop or cancel it first")
    who = runlock.holder(target)
    if who is not None and not (reading and who.get("shared")):
        raise BusyError(f"{target} is in use by {runlock.describe(who)}; start this once it has ended")


def record_end(process: JobProcess, tail: RecordTail) -> None:
    """A job's process ended without a final event: the server writes one (`record_lost`: its exit status and
    stderr), unless another process now holds the folder (the job was refused: a CLI run took it first), whose
    events are its own: then the refusal is said in this job's view only."""
    holder = runlock.held_by(process.events_folder)
    if holder is not None and holder.get("token") != process.record.get("token"):
        tail.record.add(Error(message=f"the job could not start: {process.events_folder} is in use by "
                              f"{runlock.describe(holder)}"))
        return
    try:
        record_lost(process)
    except OSError as error:
        log.warning("could not record how the job of %s ended: %s", process.folder, error)
    tail.update()


def find_jobs(outputs_root: Path, damaged: list[str] | None = None) -> list[JobProcess]:
    """The jobs an earlier server started (job.json in a job folder; studio/jobfiles.py moved an older
    server's out of its run folders first). A damaged one (a training's target no run folder of this root) is
    left out and said in `damaged`. Each one's process is found by pid, or (a job.json without one) by the
    lock its job holds."""
    root = Path(outputs_root).resolve()
    found = []
    for record in sorted(jobs_folder(root).glob(f"*/{JOB_FILE}")):
        process = JobProcess.attach(record.parent)
        run = process.events_folder if process is not None else None
        if process is not None and (run == process.folder or (run.parent == root and run.name[:1] not in ("", "."))):
            found.append(process)
        elif damaged is not None:
            damaged.append(f"{record} is damaged (not a job record this server wrote); that job is not followed")
    return found
