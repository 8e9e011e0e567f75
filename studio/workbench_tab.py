"""The page's dataset workbench tab: every image with its caption (a page at a time), one caption edited,
bulk actions with undo, the tag table, and the dataset doctor with its one-click fixes.

Built by `build_workbench_tab(...)` inside the page's `gr.Blocks` (the page decides which folders may be
opened, through `folder_problem`); the logic is studio/captions_editor.py and lora_core/doctor*.py, and the
handlers here are plain methods, so they are tested without a server. Thumbnails are small JPEG copies under
`thumbnails_root` (the page serves that folder, never the originals). Named API endpoints: `workbench_page`,
`caption_save`, `caption_bulk`, `caption_undo`, `doctor_fix`, and studio/doctor_job.py's `doctor` and
`doctor_status` (the doctor is a page job: the server never examines the images itself) and caption_job.py's
`caption_model` (a captioning job). Never imports torch; the fixes are small file edits done here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

from lora_core.errors import UserError
from studio import captions_editor as ce
from studio.caption_job import CaptionJobPanel
from studio.doctor_job import DoctorJobPanel
from studio.jobs import Studio

THUMBNAIL_SIZE = 160
MAX_PIXELS = 64_000_000  # lora_core.dataset.MAX_PIXELS
BULK_ACTIONS = {  # label -> (needs text, needs replacement)
    "Add tag at the start": (True, False), "Add tag at the end": (True, False), "Remove tag": (True, False),
    "Find and replace (plain text)": (True, True), "Trigger word first": (False, False),
    "Remove trigger word": (False, False)}
FIXES = ("Exclude from training", "Put trigger word in caption", "Convert to RGB PNG", "Train on it again")


def thumbnail(source: Path, root: Path) -> str:
    """A small JPEG copy of `source` under `root`, made once per (path, size, mtime); the image itself on error."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = root / f"wb-{key}.jpg"
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:  # training refuses it too; never decode it
                    raise ValueError("too large")
                image.draft("RGB", (THUMBNAIL_SIZE * 2, THUMBNAIL_SIZE * 2))
                small = _eight_bit(ImageOps.exif_transpose(image))
                small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
                small.convert("RGBA").convert("RGB").save(target, format="JPEG", quality=80)
        except (OSError, ValueError, Image.DecompressionBombError):
            Image.new("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE), (128, 128, 128)).save(target, format="JPEG")
    return str(target)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images scaled to 8 bits as training does (Pillow's convert would clip them white)."""
    if not image.mode.startswith("I"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if pixels.max() > 255 else 255.0
    return Image.fromarray((pixels / peak * 255.0).clip(0, 255).astype(np.uint8), "L")


def _label(item: ce.Caption) -> str:
    excluded = " (excluded from training)" if item.excluded else ""
    return f"{item.name}{excluded} · {item.problem or item.text or '(no caption)'}"


def _first_trigger(trigger_words: str) -> str:
    return next((word.strip() for word in (trigger_words or "").split(",") if word.strip()), "")


class WorkbenchTab:
    def __init__(self, thumbnails_root: Path, folder_problem: Callable[[str], str | None] | None = None,
                 dataset_path: gr.Textbox | None = None, trigger_words: gr.Textbox | None = None,
                 studio: Studio | None = None):
        self.thumbnails_root = Path(thumbnails_root)
        self.folder_problem = folder_problem or (lambda folder: None)
        self.dataset_path, self.trigger_words = dataset_path, trigger_words
        # captioning with a model is a page job: only with the server's job registry
        self.captioner = CaptionJobPanel(studio, self.folder_problem) if studio is not None else None
        self.doctor = DoctorJobPanel(studio, self.folder_problem)  # the doctor too (without one it says so)

    # --- the logic behind each control ---
    def store(self, folder: str) -> ce.CaptionStore:
        folder = (folder or "").strip()
        if not folder:
            raise ce.CaptionError("type or upload a dataset folder first")
        if problem := self.folder_problem(folder):
            raise ce.CaptionError(problem)
        return ce.store_for(Path(folder).expanduser())

    def page(self, folder: str, number: float | None, query: str) -> tuple[Any, ...]:
        """(gallery, page note, names on the page, tag rows, message)."""
        try:
            store = self.store(folder)
            page = store.page(int(number or 1) - 1, query=query or "")
            tags = [[tag, count] for tag, count in store.tag_counts()]
        except UserError as error:
            return [], "", [], [], f"**{error}**"
        gallery = [(thumbnail(Path(item.image), self.thumbnails_root), _label(item)) for item in page.items]
        note = f"page {page.page + 1} of {page.pages} · {page.total} image(s)"
        return gallery, note, [item.name for item in page.items], tags, ""

    def select(self, folder: str, names: list[str], event: gr.SelectData) -> tuple[str, str, str, str]:
        """(name, caption, version as read, message) of the image clicked in the gallery."""
        try:
            caption = self.store(folder).read(names[event.index])
        except (UserError, IndexError, TypeError) as error:
            return "", "", "", f"**{error}**"
        return caption.name, caption.text, caption.version, ""

    def save(self, folder: str, name: str, text: str, version: str) -> tuple[str, str]:
        """(message, the new version). A caption changed elsewhere since it was read is refused, not lost."""
        try:
            saved = self.store(folder).save(name, text or "", version or "")
        except ce.CaptionConflict as conflict:
            return f"**Not saved:** {conflict}", version
        except UserError as error:
            return f"**{error}**", version
        return f"Saved {saved.name}.", saved.version

    def bulk(self, folder: str, action: str, text: str, replacement: str, trigger_words: str) -> str:
        trigger = _first_trigger(trigger_words)
        changes = {"Add tag at the start": lambda: ce.add_tag(text, first=True),
                   "Add tag at the end": lambda: ce.add_tag(text), "Remove tag": lambda: ce.remove_tag(text),
                   "Find and replace (plain text)": lambda: ce.replace_text(text, replacement or ""),
                   "Trigger word first": lambda: ce.trigger_first(trigger),
                   "Remove trigger word": lambda: ce.remove_trigger(trigger)}
        if action not in changes:
            return "**Choose a bulk action.**"
        needs_text, _ = BULK_ACTIONS[action]
        if needs_text and not (text or "").strip():
            return "**Type the tag or text first.**"
        if not needs_text and not trigger:
            return "**Type the trigger words on the Train tab first.**"
        try:
            result = self.store(folder).bulk(action, changes[action]())
        except UserError as error:
            return f"**{error}**"
        return f"{action}: {len(result.changed)} caption(s) changed. Undo puts them back."

    def undo(self, folder: str) -> str:
        try:
            result = self.store(folder).undo()
        except UserError as error:
            return f"**{error}**"
        kept = f"; {len(result.skipped)} edited since were left as they are" if result.skipped else ""
        return f"Undone: {len(result.changed)} caption(s) restored{kept}."

    def fix(self, folder: str, action: str, name: str, trigger_words: str) -> str:
        from lora_core import doctor_fixes

        try:
            store = self.store(folder)
            if not name:
                return "**Pick a file first.**"
            if action == FIXES[0]:
                doctor_fixes.exclude(store.folder, [name])
                return f"{name} is left out of training (still on disk; listed in .lora-studio-exclude)."
            if action == FIXES[1]:
                trigger = _first_trigger(trigger_words)
                changed = doctor_fixes.add_trigger(store.folder, [name], trigger) if trigger else None
                return "**Type the trigger words first.**" if changed is None else (
                    f"“{trigger}” put first in the caption of {name}." if changed else f"{name} already has it.")
            if action == FIXES[2]:
                return f"Wrote {doctor_fixes.convert(store.folder, name)}; {name} is kept and left out of training."
            if action == FIXES[3]:
                back = doctor_fixes.include(store.folder, [name])
                return f"{name} trains again." if back else f"{name} was not excluded."
        except UserError as error:
            return f"**{error}**"
        return "**Choose a fix.**"

    # --- layout ---
    def build(self) -> None:
        with gr.Tab("Captions & doctor", elem_id="tab-workbench"):
            with gr.Row():
                self.folder = gr.Textbox(label="Dataset folder", scale=4, elem_id="wb-folder",
                                         info="The Train tab's dataset folder; Load shows its images.")
                self.triggers = self.trigger_words or gr.Textbox(label="Trigger words", scale=2,
                                                                 elem_id="wb-trigger")
                self.load_button = gr.Button("Load", scale=1, elem_id="wb-load")
            with gr.Row():
                self.query = gr.Textbox(label="Filter (name or caption contains)", scale=3, elem_id="wb-query")
                self.page_number = gr.Number(1, label="Page", precision=0, minimum=1, scale=1, elem_id="wb-page")
                self.page_note = gr.Markdown("", elem_id="wb-page-note")
            self.gallery = gr.Gallery(label="Images (click one to edit its caption)", columns=8, height=380,
                                      object_fit="cover", allow_preview=False, elem_id="wb-gallery")
            self.names = gr.State([])
            self.version = gr.State("")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self.name = gr.Textbox(label="Image", interactive=False, elem_id="wb-name")
                    self.caption = gr.Textbox(label="Caption", lines=3, elem_id="wb-caption")
                    self.save_button = gr.Button("Save caption", variant="primary", elem_id="wb-save")
                    self._bulk_controls()
                    self.message = gr.Markdown("", elem_id="wb-message")
                with gr.Column(scale=2):
                    self.tags = gr.Dataframe(headers=["tag", "images"], value=[], interactive=False,
                                             label="Tags", max_height=360, elem_id="wb-tags")
            if self.captioner is not None:
                self.captioner.build()
            self._doctor_controls()

    def _bulk_controls(self) -> None:
        with gr.Accordion("Bulk actions (every caption of the folder)", open=True, elem_id="wb-bulk"):
            with gr.Row():
                self.action = gr.Dropdown(list(BULK_ACTIONS), label="Action", scale=2, elem_id="wb-action")
                self.text = gr.Textbox(label="Tag or text", scale=2, elem_id="wb-text")
                self.replacement = gr.Textbox(label="Replace with", scale=2, elem_id="wb-replacement")
            with gr.Row():
                self.apply_button = gr.Button("Apply to all", elem_id="wb-apply")
                self.undo_button = gr.Button("Undo last bulk action", elem_id="wb-undo")

    def _doctor_controls(self) -> None:
        with gr.Accordion("Dataset doctor", open=True, elem_id="wb-doctor"):
            self.doctor.build()
            with gr.Row():
                self.fix_file = gr.Dropdown([], label="File", scale=2, elem_id="wb-fix-file")
                self.fix_action = gr.Dropdown(list(FIXES), label="Fix", scale=2, elem_id="wb-fix-action")
                self.fix_button = gr.Button("Apply fix", scale=1, elem_id="wb-fix")
            self.fix_message = gr.Markdown("", elem_id="wb-fix-message")

    def wire(self, demo: gr.Blocks) -> None:
        shown = [self.gallery, self.page_note, self.names, self.tags, self.message]
        paging = [self.folder, self.page_number, self.query]
        if self.dataset_path is not None:  # the Train tab's folder fills this one
            self.dataset_path.change(lambda folder: folder, self.dataset_path, self.folder, api_name=False)
        self.load_button.click(self.page, paging, shown, api_name="workbench_page")
        for control in (self.page_number, self.query):
            control.submit(self.page, paging, shown, api_name=False)
        self.gallery.select(self.select, [self.folder, self.names], [self.name, self.caption, self.version,
                                                                    self.message], api_name=False)
        self.save_button.click(self.save, [self.folder, self.name, self.caption, self.version],
                               [self.message, self.version], api_name="caption_save").then(
            self._refresh, paging, shown, api_name=False)
        self.apply_button.click(self.bulk, [self.folder, self.action, self.text, self.replacement, self.triggers],
                                self.message, api_name="caption_bulk").then(self._refresh, paging, shown,
                                                                              api_name=False)
        self.undo_button.click(self.undo, self.folder, self.message, api_name="caption_undo").then(
            self._refresh, paging, shown, api_name=False)
        self.doctor.wire(self.folder, self.triggers, self.fix_file)
        self.fix_button.click(self.fix, [self.folder, self.fix_action, self.fix_file, self.triggers],
                              self.fix_message, api_name="doctor_fix").then(self._refresh, paging, shown,
                                                                            api_name=False)
        if self.captioner is not None:
            self.captioner.wire(self.folder)

    def _refresh(self, folder: str, number: float | None, query: str) -> tuple[Any, ...]:
        """The page again after a save, a bulk action or a fix, keeping the message the action just showed
        (`page` would clear it, and a browser could miss a refused save)."""
        return (*self.page(folder, number, query)[:4], gr.update())


def build_workbench_tab(thumbnails_root: Path, folder_problem: Callable[[str], str | None] | None = None,
                        dataset_path: gr.Textbox | None = None, trigger_words: gr.Textbox | None = None,
                        demo: gr.Blocks | None = None, studio: Studio | None = None) -> WorkbenchTab:
    """Build the tab inside the current `gr.Blocks`; wire it when `demo` is given (else call `.wire(demo)`).
    With the server's `studio`, the tab can caption the folder with a model (a page job)."""
    tab = WorkbenchTab(thumbnails_root, folder_problem, dataset_path, trigger_words, studio)
    tab.build()
    if demo is not None:
        tab.wire(demo)
    return tab
