"""The dataset doctor as a job: what the page's Doctor button starts (studio/doctor_job.py).

    python -m lora_core doctor DATASET [--trigger WORDS] [--config FILE] [--set NAME=VALUE ...] --events [--out FILE]

The same checks as `doctor DATASET` (lora_core/doctor.py), run through the one command wrapper of every tool
job (job.tool_command): JSON-lines events on stdout and nothing else, SIGTERM or SIGINT stops it between
images, the page's job folder locked and its events.jsonl written by the job itself, exactly one final event.
Events: `doctor_progress` (images measured of the folder's total; at most about four a second), then one of
`doctor_complete`, `error` or `interrupted`.

The findings go into a file, not into the final event: `--out FILE`, else `findings.json` in the page's job
folder (LORA_JOB_FOLDER). A large dataset's findings (a near-duplicate group names every file in it) could
make one event line longer than a reader of events.jsonl takes, and the page reads a job's events on every
poll; `doctor_complete` names the file and carries the counts. The file holds what `doctor --json` prints:
the findings as a list (one folder), or {folder: findings} (a config's several concept folders).
Exit status: 0 once the findings are written (whether or not there are any), 1 on an error, 130/143 when
stopped. The doctor never touches a GPU: the page runs it at once, beside a training (studio/pipeline.py).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lora_core import doctor
from lora_core.errors import UserError
from lora_core.events import DoctorComplete, DoctorProgress, Event, Interrupted
from lora_core.files import atomic_write_text
from lora_core.runlock import JOB_FOLDER_VARIABLE

FINDINGS_FILE = "findings.json"
PROGRESS_S = 0.25  # the least time between two progress events (the last image is always said)


def findings_path(out: str | None) -> Path:
    """Where the findings go: `--out`, else the page's job folder's findings.json."""
    if out:
        return Path(out)
    folder = os.environ.get(JOB_FOLDER_VARIABLE)
    if not folder:
        raise UserError("--events needs --out FILE (where the findings are written) when not started by the page",
                        field="out")
    return Path(folder) / FINDINGS_FILE


def progress_events(emit: Callable[[Event], None], folder: str) -> Callable[[int, int], None]:
    """examine's `progress` as `doctor_progress` events, at most one per PROGRESS_S and always the last."""
    said = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - said[0] >= PROGRESS_S:
            said[0] = now
            emit(DoctorProgress(done=done, total=total, folder=folder))
    return progress


def run_job(args: argparse.Namespace, emit: Callable[[Event], None], should_stop: Callable[[], bool]) -> Event:
    """Examine the folders `args` names, write the findings, and return the final event (which `emit` gets)."""
    from lora_core.job import tool_outcome

    started = time.perf_counter()

    def check() -> Event:
        out = findings_path(args.out)
        settings = doctor.settings_of(args)
        results = [doctor.examine(folder, target, settings, progress_events(emit, str(folder)), should_stop)
                   for folder, target in doctor.checks_of(args)]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, doctor._json(results) + "\n")
        findings = [finding for result in results for finding in result.findings]
        return DoctorComplete(path=str(out.resolve()), folders=[result.folder for result in results],
                              num_images=sum(result.num_images for result in results), num_findings=len(findings),
                              severities=dict(Counter(finding.severity for finding in findings)),
                              total_time=round(time.perf_counter() - started, 3))

    event = tool_outcome(check, {doctor.DoctorStopped: lambda stopped: Interrupted(
        step=stopped.done, message=str(stopped), checkpoint_path=None)})
    emit(event)
    return event


def main(argv: list[str]) -> int:
    """`python -m lora_core doctor ...`: with --events as a job, else doctor.py's report on stdout."""
    parser = doctor.parser()
    parser.add_argument("--events", action="store_true", help=(
        "run as a job: JSON-lines events on stdout, the findings into --out or the page's job folder"))
    parser.add_argument("--out", help="with --events: the JSON file the findings are written to")
    args = parser.parse_args(argv)
    if not args.events:
        return doctor.report(args)
    from lora_core.job import tool_command

    def said(event: DoctorComplete) -> str:
        return f"{event.num_images} image(s), {event.num_findings} finding(s): {event.path}"

    return tool_command(lambda emit, should_stop: run_job(args, emit, should_stop), DoctorComplete, said=said)
