"""The caption editor in a real browser (Playwright, Debian's Chromium), on the workbench tab served alone: load a
folder, click an image, edit and save its caption, run a bulk action, see the tag counts change and the files on
disk changed, then run the doctor (a job of the page). A screenshot goes to test-artifacts/workbench.png."""

from __future__ import annotations

from pathlib import Path

import pytest
from doctor_data import make_set

from bench.page_driver import CHROMIUM, CHROMIUM_ARGS

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                 "(apt-get install -y chromium)")]


@pytest.fixture
def workbench(tmp_path, monkeypatch):
    import gradio as gr
    from playwright.sync_api import expect, sync_playwright

    from studio.jobs import Studio
    from studio.workbench_tab import build_workbench_tab

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    studio = Studio(tmp_path / "outputs", devices=0)  # the doctor runs as its job
    with gr.Blocks() as demo:
        build_workbench_tab(tmp_path / "thumbs", demo=demo, studio=studio)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, allowed_paths=[str(tmp_path / "thumbs")])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(60_000)
            # expect's own default is 5 s: the doctor's job takes longer on a busy CPU
            expect.set_options(timeout=60_000)
            page.goto(url)
            yield page
            browser.close()
    finally:
        expect.set_options(timeout=5_000)  # playwright's default again, for other tests in this process
        demo.close()
        studio.shutdown(timeout=10)


def test_edit_a_caption_and_run_a_bulk_action_in_the_browser(workbench, tmp_path):
    from playwright.sync_api import expect

    page = workbench
    folder = make_set(tmp_path / "set", 3)
    page.locator("#wb-folder textarea").fill(str(folder))
    page.locator("#wb-load").click()
    expect(page.locator("#wb-page-note")).to_contain_text("3 image(s)")
    expect(page.locator("#wb-tags")).to_contain_text("shared")
    page.locator("#wb-gallery .thumbnail-item").nth(1).click()
    expect(page.locator("#wb-name textarea, #wb-name input").first).to_have_value("img_0001.png")
    caption = page.locator("#wb-caption textarea")
    expect(caption).to_have_value("zkdog, tag1, shared")
    caption.fill("zkdog, tag1, shared, red collar")
    page.locator("#wb-save").click()
    expect(page.locator("#wb-message")).to_contain_text("Saved img_0001.png.")
    assert (folder / "img_0001.txt").read_text() == "zkdog, tag1, shared, red collar"
    expect(page.locator("#wb-tags")).to_contain_text("red collar")

    box = page.locator("#wb-action input").first
    box.click()
    page.get_by_role("option", name="Add tag at the end").click()
    page.locator("#wb-text textarea").fill("outdoors")
    page.locator("#wb-apply").click()
    expect(page.locator("#wb-message")).to_contain_text("3 caption(s) changed")
    expect(page.locator("#wb-tags")).to_contain_text("outdoors")
    assert [(folder / f"img_000{i}.txt").read_text().endswith(", outdoors") for i in range(3)] == [True] * 3
    page.locator("#wb-undo").click()
    expect(page.locator("#wb-message")).to_contain_text("Undone: 3 caption(s) restored")
    assert (folder / "img_0000.txt").read_text() == "zkdog, tag0, shared"

    page.locator("#wb-doctor-run").click()
    expect(page.locator("#wb-doctor-summary")).to_contain_text("3 image(s) checked")
    expect(page.locator("#wb-findings")).to_contain_text("duplicate")  # make_set's images are all the same
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "workbench.png"), full_page=True)


def test_two_browsers_editing_one_caption_do_not_lose_an_edit_silently(workbench, tmp_path):
    from playwright.sync_api import expect

    first = workbench
    second = first.context.browser.new_page(viewport={"width": 1400, "height": 1200})
    second.goto(first.url)
    folder = make_set(tmp_path / "set", 2)
    for page in (first, second):  # both open img_0000's caption
        page.locator("#wb-folder textarea").fill(str(folder))
        page.locator("#wb-load").click()
        expect(page.locator("#wb-page-note")).to_contain_text("2 image(s)")
        page.locator("#wb-gallery .thumbnail-item").first.click()
        expect(page.locator("#wb-caption textarea")).to_have_value("zkdog, tag0, shared")
    first.locator("#wb-caption textarea").fill("zkdog, from the first browser")
    first.locator("#wb-save").click()
    expect(first.locator("#wb-message")).to_contain_text("Saved img_0000.png.")
    second.locator("#wb-caption textarea").fill("zkdog, from the second browser")
    second.locator("#wb-save").click()
    expect(second.locator("#wb-message")).to_contain_text("Not saved")
    expect(second.locator("#wb-message")).to_contain_text("from the first browser")
    assert (folder / "img_0000.txt").read_text() == "zkdog, from the first browser"
    second.locator("#wb-gallery .thumbnail-item").first.click()  # reload it, then the edit goes through
    expect(second.locator("#wb-caption textarea")).to_have_value("zkdog, from the first browser")
    second.locator("#wb-caption textarea").fill("zkdog, from both browsers")
    second.locator("#wb-save").click()
    expect(second.locator("#wb-message")).to_contain_text("Saved img_0000.png.")
    assert (folder / "img_0000.txt").read_text() == "zkdog, from both browsers"
    second.close()
