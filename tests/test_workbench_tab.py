"""The workbench tab: its handlers on a dataset folder (pages, an edit and a refused stale edit, bulk actions,
undo, the doctor and a fix), and the tab served by gradio and driven through its named endpoints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from doctor_data import TRIGGER, make_set, planted

from studio.workbench_tab import FIXES, WorkbenchTab, build_workbench_tab


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


def test_page_select_save_and_a_stale_save(tmp_path):
    folder = make_set(tmp_path / "set", 60)
    tab = WorkbenchTab(tmp_path / "thumbs")
    gallery, note, names, tags, message = tab.page(str(folder), 2, "")
    assert note == "page 2 of 2 · 60 image(s)" and names[0] == "img_0048.png" and len(gallery) == 12
    assert Path(gallery[0][0]).parent == tmp_path / "thumbs" and "zkdog, tag0, shared" in gallery[0][1]
    assert ["shared", 60] in tags and message == ""
    name, text, version, _ = tab.select(str(folder), names, SimpleNamespace(index=1))
    assert (name, text) == ("img_0049.png", "zkdog, tag1, shared")
    saved, new_version = tab.save(str(folder), name, "zkdog, tag1, edited", version)
    assert saved == "Saved img_0049.png." and (folder / "img_0049.txt").read_text() == "zkdog, tag1, edited"
    refused, kept = tab.save(str(folder), name, "zkdog, other browser", version)  # the version it read is stale
    assert refused.startswith("**Not saved:**") and kept == version
    assert (folder / "img_0049.txt").read_text() == "zkdog, tag1, edited" and new_version != version
    assert "value" not in tab._refresh(str(folder), 2, "")[4]  # the refresh after a save keeps its message


def test_folders_the_page_does_not_allow_are_refused(tmp_path):
    folder = make_set(tmp_path / "set", 2)
    tab = WorkbenchTab(tmp_path / "thumbs", folder_problem=lambda f: "only uploads on this server")
    assert tab.page(str(folder), 1, "")[4] == "**only uploads on this server**"
    assert tab.bulk(str(folder), "Remove tag", "shared", "", "") == "**only uploads on this server**"
    assert (folder / "img_0000.txt").read_text() == "zkdog, tag0, shared"
    assert WorkbenchTab(tmp_path / "t").page("", 1, "")[4].startswith("**type or upload")


def test_bulk_actions_change_the_tag_table_and_undo_restores(tmp_path):
    folder = make_set(tmp_path / "set", 5)
    tab = WorkbenchTab(tmp_path / "thumbs")
    assert tab.bulk(str(folder), "Add tag at the end", "outdoors", "", "") == \
        "Add tag at the end: 5 caption(s) changed. Undo puts them back."
    assert ["outdoors", 5] in tab.page(str(folder), 1, "")[3]
    assert tab.bulk(str(folder), "Remove trigger word", "", "", f"{TRIGGER}, other").startswith(
        "Remove trigger word: 5")
    assert (folder / "img_0000.txt").read_text() == "tag0, shared, outdoors"
    refused = tab.bulk(str(folder), "Trigger word first", "", "", "")
    assert refused == "**Type the trigger words on the Train tab first.**"
    assert tab.undo(str(folder)) == "Undone: 5 caption(s) restored."
    assert (folder / "img_0000.txt").read_text() == f"{TRIGGER}, tag0, shared, outdoors"
    assert tab.bulk(str(folder), "Find and replace (plain text)", "tag0", "first tag", "").startswith("Find")
    assert (folder / "img_0000.txt").read_text() == f"{TRIGGER}, first tag, shared, outdoors"


@pytest.mark.e2e  # the planted set and three doctor jobs: about 8 s
def test_the_doctor_panel_and_its_fixes(tmp_path):
    from studio.jobs import Studio

    folder = tmp_path / "set"
    files = planted(folder)
    studio = Studio(tmp_path / "outputs", devices=0)
    tab = WorkbenchTab(tmp_path / "thumbs", studio=studio)

    def check() -> tuple[str, list[list[str]], list[str]]:  # the Doctor button, then the panel once it ended
        job_id = tab.doctor.start(str(folder), "")[2]
        assert studio.wait(job_id, timeout=120).state == "complete"
        return tab.doctor.status(job_id)

    try:
        summary, rows, picker = check()
        assert summary.startswith("27 image(s) checked") and {row[1] for row in rows} >= set(files)
        assert files["blurry"] in picker
        assert tab.fix(str(folder), FIXES[0], files["blurry"], "").startswith(f"{files['blurry']} is left out")
        assert tab.fix(str(folder), FIXES[1], files["trigger_missing"], TRIGGER).startswith(f"“{TRIGGER}” put first")
        assert tab.fix(str(folder), FIXES[2], files["converted"], "") == \
            f"Wrote print_rgb.png; {files['converted']} is kept and left out of training."
        assert tab.fix(str(folder), FIXES[0], "../escape.png", "").startswith("**")
        summary, rows, picker = check()
        kinds = {row[1] for row in rows}
        assert "blurry" not in kinds and "trigger_missing" not in kinds and (folder / files["blurry"]).exists()
        assert files["blurry"] in picker  # excluded: offered to be taken back
        assert tab.fix(str(folder), FIXES[3], files["blurry"], "") == f"{files['blurry']} trains again."
        assert "blurry" in {row[1] for row in check()[1]}
    finally:
        studio.shutdown(timeout=10)


@pytest.mark.e2e  # a gradio server: about 5-10 s
def test_the_tab_served_by_gradio(tmp_path, monkeypatch):
    import gradio as gr
    from gradio_client import Client

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from helpers import wait_until

    from studio.jobs import Studio

    folder = make_set(tmp_path / "set", 3)
    studio = Studio(tmp_path / "outputs", devices=0)
    with gr.Blocks() as demo:
        build_workbench_tab(tmp_path / "thumbs", demo=demo, studio=studio)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, allowed_paths=[str(tmp_path / "thumbs")])
    try:
        client = Client(url, verbose=False)
        gallery, note, tags, message = client.predict(str(folder), 1, "", api_name="/workbench_page")
        assert note == "page 1 of 1 · 3 image(s)" and len(gallery) == 3 and not message
        assert client.predict(str(folder), "Add tag at the start", "photo", "", "",
                              api_name="/caption_bulk").startswith("Add tag at the start: 3")
        assert (folder / "img_0002.txt").read_text() == "photo, zkdog, tag2, shared"
        tags = client.predict(str(folder), 1, "", api_name="/workbench_page")[2]
        assert ["photo", 3] in [list(row) for row in tags["data"]]
        answer = client.predict(str(folder), "", api_name="/doctor")[-1]  # the doctor is a job of the page
        assert answer["state"] == "running", answer
        wait_until(lambda: studio.view(answer["job_id"]).ended, 60, what="the doctor job")
        summary, rows, files = client.predict(answer["job_id"], api_name="/doctor_status")
        assert summary.startswith("3 image(s) checked") and "duplicate" in {row[1] for row in rows}
        assert files == ["img_0000.png", "img_0001.png", "img_0002.png"]
        client.close()
    finally:
        demo.close()
        studio.shutdown(timeout=10)


def test_thumbnails_of_16_bit_and_palette_images_show_the_picture(tmp_path):
    import numpy as np
    from doctor_data import scene
    from PIL import Image

    from studio.workbench_tab import thumbnail

    picture = scene(3, (600, 500)).convert("L")
    Image.fromarray(np.asarray(picture, np.uint16) * 257).save(tmp_path / "deep.png")
    picture.quantize(32).save(tmp_path / "palette.png")
    for name in ("deep.png", "palette.png"):
        with Image.open(thumbnail(tmp_path / name, tmp_path / "thumbs")) as small:
            assert small.size == (160, 133) and np.asarray(small).std() > 20, name  # not a grey placeholder
