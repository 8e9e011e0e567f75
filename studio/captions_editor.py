"""The caption editor's logic, for the page (no gradio here, and never torch): every image of a dataset
folder with its caption, a page at a time; one caption edited; bulk actions over all images (or a
selection) with an undo of the last one; the tag-frequency table.

Safety: a name is a plain file name of an image in the folder, and a caption path that resolves outside the
folder (a link) is refused; every .txt is written atomically (lora_core.files), so training never reads a
half-written caption.

Two browsers: every caption the page shows carries its `version`, the SHA-256 of the file's bytes as read
("" for no file). A save names the version it edited; if the file changed since (another browser, a bulk
action, an editor outside the studio), the save is refused with `CaptionConflict`, which holds the current
text so the page can show both. Writes to one folder are serialised by a lock, so a bulk action and a save
never interleave. Undo restores only the captions still as the bulk action left them, and says which not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lora_core.errors import UserError
from lora_core.files import FILE_MODE, TMP_SUFFIX, atomic_write_text

# The same as lora_core.dataset's (which imports torch through its caption module; tests keep them equal).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MASK_SUFFIX = ".mask.png"  # a loss mask (lora_core/masks.py), not an image to caption; as dataset.MASK_SUFFIX
EXCLUDE_FILE = ".lora-studio-exclude"
MAX_CAPTION_BYTES = 64 * 1024  # what dataset.scan reads of a caption file
PER_PAGE = 48
NO_FILE = ""  # the version of a caption that has no file


class CaptionError(UserError):
    field = "dataset_path"


class CaptionConflict(CaptionError):
    """The caption changed on disk since the page read it; `current` is what is there now."""

    def __init__(self, name: str, current: str, version: str):
        self.name, self.current, self.version = name, current, version
        super().__init__(f"the caption of {name} was changed elsewhere (another browser, a bulk action or an "
                         f"editor) since you opened it, so your edit was not saved. It now reads: “{current[:200]}”. "
                         "Reload it, then make your change again")


@dataclass
class Caption:
    name: str  # the image's file name
    text: str
    version: str  # sha256 of the caption file's bytes, NO_FILE when there is none
    image: str  # the image's path, for a thumbnail
    excluded: bool = False
    problem: str = ""  # why the caption cannot be read (shown instead of failing the whole page)


@dataclass
class Page:
    items: list[Caption]
    total: int  # images matching the filter
    page: int
    pages: int


@dataclass
class BulkResult:
    action: str
    changed: list[str]
    skipped: list[str] = field(default_factory=list)  # for undo: captions edited since the bulk action


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def _version(data: bytes | None) -> str:
    return NO_FILE if data is None else hashlib.sha256(data).hexdigest()


class CaptionStore:
    """One dataset folder's captions. Keep one per folder (`store_for`), so undo and the lock are shared."""

    def __init__(self, folder: str | Path, root: str | Path | None = None):
        self.folder = Path(folder).resolve()
        if root is not None and not self.folder.is_relative_to(Path(root).resolve()):
            raise CaptionError(f"{folder} is not inside the allowed datasets folder {root}")
        if not self.folder.is_dir():
            raise CaptionError(f"{folder} is not a folder")
        self.lock = threading.RLock()
        self._undo: tuple[str, dict[str, tuple[bytes | None, str]]] | None = None
        self._texts: dict[str, tuple[tuple[int, int, int] | None, str]] = {}  # name -> (stat key, text)

    # --- reading ---
    def names(self) -> list[str]:
        """The images of the folder, in dataset.scan's order."""
        with os.scandir(self.folder) as entries:
            return sorted(entry.name for entry in entries if not entry.name.startswith(".")
                          and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file()
                          and not entry.name.lower().endswith(MASK_SUFFIX)
                          and (not entry.is_symlink() or self._inside(Path(entry.path))))

    def _inside(self, path: Path) -> bool:
        """A link that leads out of the folder is not the dataset's (training refuses it too)."""
        try:
            return path.resolve(strict=True).is_relative_to(self.folder)
        except (OSError, RuntimeError):
            return False

    def _caption_path(self, name: str) -> Path:
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name or "\x00" in name:
            raise CaptionError(f"{name!r} is not an image of this dataset")
        image = self.folder / name
        if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES or not image.is_file() or not self._inside(image):
            raise CaptionError(f"{name} is not an image in {self.folder}")
        path = image.with_suffix(".txt")
        if not path.resolve().is_relative_to(self.folder):
            raise CaptionError(f"the caption of {name} is a link that leads outside the dataset folder; "
                               "replace it with a plain .txt file")
        return path

    def _raw(self, name: str) -> bytes | None:
        path = self._caption_path(name)
        if not path.exists():
            return None
        try:  # non-blocking open, then a check of what was opened: a FIFO named .txt never blocks a request
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise CaptionError(f"{path.name} cannot be read ({error.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CaptionError(f"{path.name} is not a regular file")
            return handle.read(MAX_CAPTION_BYTES)

    def read(self, name: str, excluded: set[str] | None = None) -> Caption:
        raw = self._raw(name)
        text = raw.decode("utf-8-sig", errors="replace").strip() if raw is not None else ""
        excluded = self._excluded() if excluded is None else excluded
        return Caption(name, text, _version(raw), str(self.folder / name), name in excluded)

    def _listed(self, name: str, excluded: set[str]) -> Caption:
        try:
            return self.read(name, excluded)
        except CaptionError as error:
            return Caption(name, "", "unreadable", str(self.folder / name), name in excluded, str(error))

    def _excluded(self) -> set[str]:
        path = self.folder / EXCLUDE_FILE
        if not path.is_file():
            return set()
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return {name for line in lines if (name := line.split("#", 1)[0].strip())}

    def text(self, name: str) -> str:
        """The caption's text, re-read only when the file's (mtime, size, inode) changed: the tag table and the
        filter read every caption, and 2,000 reads cost about 0.35 s at each page turn."""
        path = self.folder / (os.path.splitext(name)[0] + ".txt")
        try:
            info = os.stat(path)
            key = (info.st_mtime_ns, info.st_size, info.st_ino)
        except OSError:
            key = None
        cached = self._texts.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        text = self._listed(name, set()).text
        self._texts[name] = (key, text)
        return text

    def page(self, number: int = 0, per_page: int = PER_PAGE, query: str = "") -> Page:
        """One page of images with captions; `query` keeps those whose name or caption contains it."""
        names, query, excluded = self.names(), query.strip().lower(), self._excluded()
        if query:
            names = [name for name in names
                     if query in name.lower() or query in self.text(name).lower()]
        pages = max(1, -(-len(names) // per_page))
        number = min(max(0, number), pages - 1)
        shown = names[number * per_page:(number + 1) * per_page]
        return Page([self._listed(name, excluded) for name in shown], len(names), number, pages)

    def tag_counts(self) -> list[tuple[str, int]]:
        """(tag, images whose caption has it), most frequent first; tags compare case-insensitively."""
        counts: Counter[str] = Counter()
        for name in self.names():
            counts.update({tag.lower() for tag in split_tags(self.text(name))})
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    # --- writing ---
    def save(self, name: str, text: str, version: str) -> Caption:
        """Write one caption, if the file is still at `version` (what the page read); CaptionConflict if not."""
        with self.lock:
            current = self.read(name)
            if current.version != version:
                raise CaptionConflict(name, current.text, current.version)
            self._write(name, text)
            return self.read(name)

    def _write(self, name: str, text: str) -> None:
        data = text.strip()
        if len(data.encode("utf-8")) > MAX_CAPTION_BYTES:
            raise CaptionError(f"the caption of {name} is over {MAX_CAPTION_BYTES // 1024} KiB; a text encoder "
                               "reads about 75 tokens")
        atomic_write_text(self._caption_path(name), data)

    def bulk(self, action: str, change: Callable[[str], str], names: list[str] | None = None) -> BulkResult:
        """Apply `change` to the captions of `names` (all images when None); remembered for `undo`."""
        with self.lock:
            before: dict[str, tuple[bytes | None, str]] = {}
            writes: dict[str, str] = {}
            for name in names if names is not None else self.names():
                raw = self._raw(name)
                old = raw.decode("utf-8-sig", errors="replace").strip() if raw is not None else ""
                new = " ".join(change(old).split())
                if new != old:
                    writes[name] = new
                    before[name] = (raw, _version(new.encode("utf-8")))
            self._write_many(writes)
            self._undo = (action, before)
            return BulkResult(action, sorted(before))

    def _write_many(self, texts: dict[str, str]) -> None:
        """Each caption atomically, as atomic_write_text would, but with the temporaries' fsyncs in parallel:
        one after another, 2,000 fsyncs took 18 s; at once, the disk's journal commits them together."""
        paths = {self._caption_path(name): text.strip().encode("utf-8") for name, text in texts.items()}
        temporaries: list[tuple[int, str, Path]] = []
        try:
            for path, data in paths.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=self.folder)
                temporaries.append((fd, tmp, path))
                with contextlib.suppress(OSError):
                    os.fchmod(fd, FILE_MODE)
                os.write(fd, data)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(os.fsync, [fd for fd, _, _ in temporaries]))
            for fd, tmp, path in temporaries:
                os.close(fd)
                os.replace(tmp, path)
            temporaries = []
        finally:
            for fd, tmp, _ in temporaries:
                with contextlib.suppress(OSError):
                    os.close(fd)
                Path(tmp).unlink(missing_ok=True)
        if paths:
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def undo(self) -> BulkResult:
        """Put back the captions the last bulk action changed, except those edited since (listed)."""
        with self.lock:
            if self._undo is None:
                raise CaptionError("there is no bulk action to undo")
            action, before = self._undo
            restored, skipped, writes = [], [], {}
            excluded = self._excluded()
            for name, (raw, after) in before.items():
                if self.read(name, excluded).version != after:
                    skipped.append(name)
                    continue
                restored.append(name)
                if raw is None:
                    self._caption_path(name).unlink()  # the bulk action made this file; nothing else is in it
                else:
                    writes[name] = raw.decode("utf-8-sig", errors="replace")
            self._write_many(writes)
            self._undo = None
            return BulkResult(f"undo {action}", sorted(restored), sorted(skipped))


# --- the bulk actions, as caption -> caption functions ---
def _same(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def add_tag(tag: str, first: bool = False) -> Callable[[str], str]:
    tag = " ".join(tag.split())

    def change(caption: str) -> str:
        tags = split_tags(caption)
        if not tag or any(_same(t, tag) for t in tags):
            return caption
        return ", ".join([tag, *tags] if first else [*tags, tag])
    return change


def remove_tag(tag: str) -> Callable[[str], str]:
    def change(caption: str) -> str:
        tags = split_tags(caption)
        kept = [t for t in tags if not _same(t, tag)]
        return ", ".join(kept) if len(kept) != len(tags) else caption
    return change


def replace_text(find: str, replacement: str) -> Callable[[str], str]:
    """Plain text, not a pattern; case as written."""
    def change(caption: str) -> str:
        return caption.replace(find, replacement) if find else caption
    return change


def trigger_first(trigger: str) -> Callable[[str], str]:
    """The trigger as the first tag: moved there if it is a tag, put there if it is not (a trigger inside a
    sentence caption is left where it is and still put first)."""
    return lambda caption: add_tag(trigger, first=True)(remove_tag(trigger)(caption))


def remove_trigger(trigger: str) -> Callable[[str], str]:
    """The trigger out of every caption: as a tag, or as a word of a sentence."""
    word = re.compile(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", re.IGNORECASE)

    def change(caption: str) -> str:
        caption = remove_tag(trigger)(caption)
        if not trigger.strip() or not word.search(caption):
            return caption
        return ", ".join(split_tags(" ".join(word.sub("", caption).split()).replace(" ,", ",")))
    return change


_STORES: dict[Path, CaptionStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(folder: str | Path, root: str | Path | None = None) -> CaptionStore:
    """The one store of `folder` in this process (every browser's requests share its lock and undo)."""
    key = Path(folder).resolve()
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = CaptionStore(key, root)
        elif root is not None and not key.is_relative_to(Path(root).resolve()):
            raise CaptionError(f"{folder} is not inside the allowed datasets folder {root}")
        return _STORES[key]
