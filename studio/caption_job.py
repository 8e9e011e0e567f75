"""The Captions & doctor tab's "Caption with a model": captioning a dataset folder as a page job.

The job is `python -m lora_core caption DATASET --option ...` (lora_core/captioner.py), queued through the same
queue and devices as training (`Studio.submit_tool("caption", ...)`), with the same progress, Stop and one final
event. The panel shows its progress (images done of those to caption) until it ends; then the caption editor
shows the new captions (the tab's Load). The options are checked by the job itself (an error event names the
option), so the server never imports the captioning model's libraries. Named API endpoints: `caption_model`
(queue it: `{job_id, state, position, output_path}` or `{error}`), `caption_model_status`, `caption_model_stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from studio.jobs import BusyError, Studio

TICK_S = 1.0
DEFAULT_MAX_TOKENS = 160


def caption_args(model: str, overwrite: bool, prefix: str, max_new_tokens: float | None) -> list[str]:
    """The caption command's options after its dataset folder (only those the user set)."""
    args = [f"--model={model.strip()}"] if (model or "").strip() else []
    if overwrite:
        args.append("--overwrite")
    if (prefix or "").strip():
        args.append(f"--prefix={prefix.strip()}")  # `=`: a prefix may start with "-"
    if max_new_tokens:
        args.append(f"--max-new-tokens={int(max_new_tokens)}")
    return args


class CaptionJobPanel:
    def __init__(self, studio: Studio, folder_problem: Callable[[str], str | None]):
        self.studio, self.folder_problem = studio, folder_problem

    def start(self, folder: str, model: str, overwrite: bool, prefix: str,
              max_new_tokens: float | None) -> tuple[str, str, dict[str, Any]]:
        """Queue captioning of `folder`: (status text, job id, the answer for the API)."""
        path = Path((folder or "").strip()).expanduser()
        problem = self.folder_problem(str(path)) if folder else "choose the dataset folder first"
        if problem is None and not path.is_dir():
            problem = f"{path} is not a folder"
        if problem:
            return f"**{problem}**", "", {"error": problem}
        try:
            submitted = self.studio.submit_tool("caption", path.resolve(),
                                                caption_args(model, overwrite, prefix, max_new_tokens))
        except (BusyError, ValueError, OSError) as error:
            return f"**{error}**", "", {"error": str(error)}
        return self.status(submitted.job_id), submitted.job_id, submitted.to_dict()

    def status(self, job_id: str) -> str:
        """The caption job's progress or outcome, in words."""
        if not job_id:
            return ""
        view = self.studio.view(job_id)
        if view.state == "queued":
            return f"Captioning is queued: {view.message}"
        if view.state == "complete":
            return f"Captioning is complete: {view.message}. Load shows the new captions."
        if view.state in ("failed", "stopped"):
            return f"Captioning {view.state}: {view.message or 'no result'}"
        done = f"{view.step} of {view.total_steps} images" if view.total_steps else "loading the model"
        return f"Captioning ({view.state}): {done}"

    def stop(self, job_id: str) -> str:
        if job_id and self.studio.stop(job_id):
            return "Stopping: the captions written so far stay."
        return "No caption job of this page is running."

    # --- layout ---
    def build(self) -> None:
        with gr.Accordion("Caption with a model", open=False, elem_id="wb-captioner"):
            with gr.Row():
                self.model = gr.Textbox(label="Model (hub id or local folder; empty: the default)", scale=3,
                                        elem_id="wb-cap-model")
                self.max_tokens = gr.Number(DEFAULT_MAX_TOKENS, label="Longest caption (tokens)", precision=0,
                                            minimum=1, maximum=1024, scale=1, elem_id="wb-cap-max")
            with gr.Row():
                self.prefix = gr.Textbox(label="Put first in every caption (trigger words)", scale=3,
                                         elem_id="wb-cap-prefix")
                self.overwrite = gr.Checkbox(False, label="Replace existing captions (else only images without "
                                             "one)", scale=2, elem_id="wb-cap-overwrite")
            with gr.Row():
                self.start_button = gr.Button("Caption with a model", variant="primary", elem_id="wb-cap-start")
                self.stop_button = gr.Button("Stop captioning", elem_id="wb-cap-stop")
            self.status_text = gr.Markdown("", elem_id="wb-cap-status")
            self.job_id = gr.Textbox(visible=False, elem_id="wb-cap-job")
            self.answer = gr.JSON(visible=False)
            self.timer = gr.Timer(TICK_S)

    def wire(self, folder: gr.Textbox) -> None:
        self.start_button.click(self.start, [folder, self.model, self.overwrite, self.prefix, self.max_tokens],
                                [self.status_text, self.job_id, self.answer], api_name="caption_model")
        self.timer.tick(self.status, self.job_id, self.status_text, api_name="caption_model_status",
                        show_progress="hidden")
        self.stop_button.click(self.stop, self.job_id, self.status_text, api_name="caption_model_stop")
