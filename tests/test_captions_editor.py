"""The caption editor's logic: pages, one edit with conflict detection, bulk actions and their undo, the
tag table, and that nothing is written outside the dataset folder or half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from doctor_data import make_set
from helpers import ROOT

from studio import captions_editor as ce


def test_constants_match_the_dataset_scan():
    from lora_core import dataset

    assert ce.IMAGE_SUFFIXES == dataset.IMAGE_SUFFIXES and ce.EXCLUDE_FILE == dataset.EXCLUDE_FILE
    assert ce.MASK_SUFFIX == dataset.MASK_SUFFIX
    assert ce.MAX_CAPTION_BYTES == dataset.MAX_CAPTION_FILE_BYTES


def test_the_editor_never_imports_torch():
    code = "import sys, studio.captions_editor; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_pages_of_2000_images_stay_quick(tmp_path):
    store = ce.CaptionStore(make_set(tmp_path / "set", 2000))
    start = time.perf_counter()
    page = store.page(3, per_page=48)
    assert time.perf_counter() - start < 1.0
    assert page.total == 2000 and page.pages == 42 and page.page == 3
    assert [c.name for c in page.items][:2] == ["img_0144.png", "img_0145.png"]
    assert page.items[0].text == "zkdog, tag0, shared" and len(page.items[0].version) == 64
    assert store.page(99).page == 41 and len(store.page(99).items) == 2000 - 41 * 48
    start = time.perf_counter()
    counts = dict(store.tag_counts())
    filtered = store.page(0, query="img_1999")
    assert time.perf_counter() - start < 3.0
    assert counts["shared"] == 2000 and counts["tag1"] == 667 and filtered.total == 1
    (store.folder / "img_0007.txt").write_text("edited outside the studio")  # the table follows
    assert dict(store.tag_counts())["shared"] == 1999 and store.page(0, query="outside").total == 1


def test_an_edit_is_saved_atomically_and_a_stale_one_is_refused(tmp_path):
    store = ce.CaptionStore(make_set(tmp_path / "set", 3, {2: None}))
    first, second = store.read("img_0000.png"), store.read("img_0000.png")  # two browsers
    saved = store.save("img_0000.png", "  zkdog, red collar  ", first.version)
    assert (tmp_path / "set" / "img_0000.txt").read_text() == "zkdog, red collar" and saved.version != first.version
    with pytest.raises(ce.CaptionConflict) as refused:
        store.save("img_0000.png", "zkdog, blue collar", second.version)
    assert refused.value.current == "zkdog, red collar" and "changed elsewhere" in str(refused.value)
    assert (tmp_path / "set" / "img_0000.txt").read_text() == "zkdog, red collar"
    new = store.read("img_0002.png")
    assert new.version == ce.NO_FILE and new.text == ""
    store.save("img_0002.png", "zkdog, new", ce.NO_FILE)
    assert (tmp_path / "set" / "img_0002.txt").read_text() == "zkdog, new"
    assert not [p for p in (tmp_path / "set").iterdir() if p.name.endswith(".tmp")]


def test_nothing_is_read_or_written_outside_the_folder(tmp_path):
    folder = make_set(tmp_path / "set", 2)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (folder / "img_0001.txt").unlink()
    (folder / "img_0001.txt").symlink_to(outside)
    store = ce.CaptionStore(folder)
    for name in ("../secret.png", "/etc/passwd", "img_0000.txt", "missing.png", "", "..", "img_0001.png"):
        with pytest.raises(ce.CaptionError):
            store.save(name, "x", ce.NO_FILE)
    assert outside.read_text() == "secret"
    with pytest.raises(ce.CaptionError):
        ce.CaptionStore(folder, root=tmp_path / "elsewhere")
    with pytest.raises(ce.CaptionError):
        ce.store_for(tmp_path, root=folder)


def test_bulk_actions_and_the_undo_of_the_last(tmp_path):
    folder = make_set(tmp_path / "set", 4, {0: "a dog with zkdog in the sun", 3: None})
    store = ce.CaptionStore(folder)
    assert store.bulk("add", ce.add_tag("outdoors")).changed == ["img_0000.png", "img_0001.png", "img_0002.png",
                                                                  "img_0003.png"]
    assert (folder / "img_0003.txt").read_text() == "outdoors"
    assert (folder / "img_0001.txt").read_text() == "zkdog, tag1, shared, outdoors"
    store.bulk("first", ce.add_tag("photo", first=True), ["img_0001.png"])
    assert (folder / "img_0001.txt").read_text() == "photo, zkdog, tag1, shared, outdoors"
    store.bulk("remove", ce.remove_tag("SHARED"))
    assert dict(store.tag_counts()).get("shared") is None
    store.bulk("replace", ce.replace_text("tag1", "tag one"))
    store.bulk("trigger first", ce.trigger_first("zkdog"))
    assert (folder / "img_0001.txt").read_text() == "zkdog, photo, tag one, outdoors"
    assert (folder / "img_0003.txt").read_text() == "zkdog, outdoors"
    store.bulk("remove trigger", ce.remove_trigger("zkdog"))
    assert (folder / "img_0000.txt").read_text() == "a dog with in the sun, outdoors"  # as a tag and as a word
    assert "zkdog" not in dict(store.tag_counts())
    edited = store.read("img_0002.png")
    store.save("img_0002.png", "my own edit", edited.version)  # after the bulk action: undo must spare it
    result = store.undo()
    assert result.skipped == ["img_0002.png"] and "img_0001.png" in result.changed
    assert (folder / "img_0001.txt").read_text() == "zkdog, photo, tag one, outdoors"
    assert (folder / "img_0002.txt").read_text() == "my own edit"
    with pytest.raises(ce.CaptionError):
        store.undo()


def test_undo_removes_only_a_caption_file_the_bulk_action_made(tmp_path):
    folder = make_set(tmp_path / "set", 2, {1: None})
    store = ce.store_for(folder)
    store.bulk("add", ce.add_tag("zkdog", first=True))
    assert (folder / "img_0001.txt").read_text() == "zkdog"
    assert ce.store_for(folder) is store and store.undo().changed == ["img_0001.png"]
    assert not (folder / "img_0001.txt").exists() and (folder / "img_0001.png").exists()


def test_concurrent_saves_from_two_browsers_lose_nothing_silently(tmp_path):
    store = ce.CaptionStore(make_set(tmp_path / "set", 1))
    version = store.read("img_0000.png").version
    outcomes: list[str] = []

    def browser(text: str) -> None:
        try:
            store.save("img_0000.png", text, version)
            outcomes.append(f"saved {text}")
        except ce.CaptionConflict:
            outcomes.append("refused")

    threads = [threading.Thread(target=browser, args=(f"edit {i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    saved = [o for o in outcomes if o.startswith("saved")]
    assert len(saved) == 1 and outcomes.count("refused") == 7
    assert store.read("img_0000.png").text == saved[0].removeprefix("saved ")
    assert sorted(os.listdir(tmp_path / "set")) == ["img_0000.png", "img_0000.txt"]  # no temporaries left


def test_links_out_of_the_folder_and_fifos_are_not_followed(tmp_path):
    folder = make_set(tmp_path / "set", 2)
    outside = make_set(tmp_path / "outside", 1)
    (folder / "linked.png").symlink_to(outside / "img_0000.png")
    (folder / "img_0001.txt").unlink()
    os.mkfifo(folder / "img_0001.txt")
    store = ce.CaptionStore(folder)
    assert store.names() == ["img_0000.png", "img_0001.png"]
    with pytest.raises(ce.CaptionError, match="not a regular file"):
        store.read("img_0001.png")  # returns at once instead of waiting for a writer
    listed = store.page().items
    assert listed[0].text and "not a regular file" in listed[1].problem and dict(store.tag_counts())["shared"] == 1
    with pytest.raises(ce.CaptionError):
        store.save("linked.png", "x", ce.NO_FILE)
    assert not (folder / "linked.txt").exists()
