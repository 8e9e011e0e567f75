"""The Captions & doctor tab's dataset doctor: checking a dataset folder as a page job.

The Doctor button queues `python -m lora_core doctor DATASET --events [--trigger WORDS]` (lora_core/doctor_job.py)
through `Studio.submit_tool("doctor", ...)`, the one way every page job starts: the server never examines an
image itself. The doctor takes no device, so it starts at once, beside a training (studio/pipeline.py). The
panel shows its progress (images measured of N) and, once it is complete, the summary, the findings table
and the fix picker's files, read from the job's findings.json. Named API endpoints: `doctor` (queue it:
`(status, rows, job_id, answer)`, answer `{job_id, state, position, output_path}` or `{error}`),
`doctor_status` (job_id: `(summary, rows, picker)`, the findings once complete), `doctor_stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from lora_core.events import DoctorComplete
from lora_core.runrecord import COMPLETE
from lora_core.safefile import read_json
from studio.captions_editor import EXCLUDE_FILE
from studio.jobs import BusyError, Studio

TICK_S = 1.0
MAX_ROWS = 1000  # findings shown in the table (the file holds them all)
MAX_FINDINGS_BYTES = 64 * 1024**2
HEADERS = ["severity", "kind", "files", "what", "why", "fix"]


def doctor_args(trigger_words: str) -> list[str]:
    """The doctor command's options after its dataset folder: as a job, with the form's trigger words."""
    words = ",".join(word.strip() for word in (trigger_words or "").split(",") if word.strip())
    return ["--events", *([f"--trigger={words}"] if words else [])]  # `=`: words may start with "-"


def excluded_names(folder: Path) -> set[str]:
    """The names in the folder's exclude list (the fix picker offers them back)."""
    path = folder / EXCLUDE_FILE
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    except OSError:
        return set()
    return {name for line in lines if (name := line.split("#", 1)[0].strip())}


def _names(finding: dict[str, Any]) -> list[str]:
    """The file names a finding (as findings.json holds it) names."""
    files = finding.get("files")
    return [name for name in files if isinstance(name, str)] if isinstance(files, list) else []


class DoctorJobPanel:
    def __init__(self, studio: Studio | None, folder_problem: Callable[[str], str | None]):
        self.studio, self.folder_problem = studio, folder_problem

    def start(self, folder: str, trigger_words: str) -> tuple[str, list[list[str]], str, dict[str, Any]]:
        """Queue the doctor for `folder`: (status text, the findings table emptied, job id, the API's answer)."""
        path = Path((folder or "").strip()).expanduser()
        problem = self.folder_problem(str(path)) if (folder or "").strip() else "type or upload a dataset folder first"
        if problem is None and not path.is_dir():
            problem = f"{path} is not a folder of images"
        if problem is None and self.studio is None:
            problem = "the dataset doctor runs as a job of the page's server; this page has none"
        if problem:
            return f"**{problem}**", [], "", {"error": problem}
        try:
            submitted = self.studio.submit_tool("doctor", path.resolve(), doctor_args(trigger_words))
        except (BusyError, ValueError, OSError) as error:
            return f"**{error}**", [], "", {"error": str(error)}
        return self.progress(submitted.job_id), [], submitted.job_id, submitted.to_dict()

    def progress(self, job_id: str) -> str:
        """The doctor job's state in words (its outcome once it ended)."""
        view = self.studio.view(job_id) if job_id and self.studio is not None else None
        if view is None:
            return ""
        if view.state == "queued":
            return f"The doctor is queued: {view.message}"
        if view.state in ("failed", "stopped"):
            return f"The doctor {view.state}: {view.message or 'no result'}"
        if view.state == COMPLETE and isinstance(view.terminal, DoctorComplete):
            event = view.terminal
            return (f"{event.num_images} image(s) checked in {event.total_time:.1f} s: "
                    + (f"{event.num_findings} finding(s)." if event.num_findings else "nothing found."))
        done = f"{view.step} of {view.total_steps} images measured" if view.total_steps else "starting"
        return f"Checking the dataset ({view.state}): {done}"

    def findings(self, job_id: str) -> tuple[list[dict[str, Any]] | None, str]:
        """The complete job's findings (from its findings.json; None when that cannot be read) and its dataset
        folder; ([], "") before it is complete."""
        view = self.studio.view(job_id) if job_id and self.studio is not None else None
        if view is None or view.state != COMPLETE or not isinstance(view.terminal, DoctorComplete):
            return [], ""
        path, folders = Path(view.terminal.path), view.terminal.folders
        found = read_json(path, MAX_FINDINGS_BYTES) if path.resolve().parent == Path(view.output_path).resolve() \
            else None  # only the job's own folder is read
        return [item for item in found if isinstance(item, dict)] if isinstance(found, list) else None, \
            folders[0] if folders else ""

    def status(self, job_id: str) -> tuple[str, list[list[str]], list[str]]:
        """`doctor_status`: (summary or progress in words, the findings table's rows, the files the fix picker
        offers: those named by a finding and those excluded, which can be taken back). Rows and files are
        empty until the job is complete."""
        found, folder = self.findings(job_id)
        summary = self.progress(job_id)
        if found is None:
            summary += " Its findings file cannot be read; check the dataset again."
        found = found or []
        rows = [[str(item.get("severity", "")), str(item.get("kind", "")), ", ".join(_names(item)[:6]),
                 *(str(item.get(key, "")) for key in ("message", "why", "fix"))] for item in found[:MAX_ROWS]]
        files = {name for item in found for name in _names(item) if "/" not in name}  # not a held-out folder's
        if len(found) > MAX_ROWS:
            summary += f" The table shows the first {MAX_ROWS}."
        return summary, rows, sorted(files | excluded_names(Path(folder))) if folder else []

    def tick(self, job_id: str, shown: str) -> tuple[Any, Any, Any, str]:
        """The timer: progress while the job runs; the findings once, when it has ended (a later tick leaves the
        table and the fix picker as the user has them)."""
        if not job_id or shown == job_id or self.studio is None:
            return gr.update(), gr.update(), gr.update(), shown
        if not self.studio.view(job_id).ended:
            return self.progress(job_id), gr.update(), gr.update(), shown
        summary, rows, files = self.status(job_id)
        return summary, rows, gr.update(choices=files, value=None), job_id

    def stop(self, job_id: str) -> str:
        if job_id and self.studio is not None and self.studio.stop(job_id):
            return "Stopping the doctor: no findings are written."
        return "No doctor job of this page is running."

    # --- layout ---
    def build(self) -> None:
        with gr.Row():
            self.button = gr.Button("Check the dataset", variant="primary", elem_id="wb-doctor-run")
            self.stop_button = gr.Button("Stop checking", elem_id="wb-doctor-stop")
        self.summary = gr.Markdown("", elem_id="wb-doctor-summary")
        self.table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, elem_id="wb-findings")
        self.job_id = gr.Textbox(visible=False, elem_id="wb-doctor-job")
        self.shown = gr.State("")  # the job whose findings the table shows
        self.answer = gr.JSON(visible=False)
        self.timer = gr.Timer(TICK_S)

    def wire(self, folder: gr.Textbox, triggers: gr.Textbox, picker: gr.Dropdown) -> None:
        self.button.click(self.start, [folder, triggers], [self.summary, self.table, self.job_id, self.answer],
                          api_name="doctor")
        self.timer.tick(self.tick, [self.job_id, self.shown], [self.summary, self.table, picker, self.shown],
                        api_name=False, show_progress="hidden")
        gr.api(self.status, api_name="doctor_status")  # what the timer shows, whole, for scripts
        self.stop_button.click(self.stop, self.job_id, self.summary, api_name="doctor_stop")
