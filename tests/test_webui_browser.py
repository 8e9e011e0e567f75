"""The web page in a real browser: Playwright driving Debian's headless Chromium (never a downloaded one).

Uploads the demo images, trains the demo, watches progress reach 100 % with a loss curve and a sample,
downloads the final LoRA, then stops a second job midway and sees its checkpoint. Screenshots go to
test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import launch_page

from bench.page_driver import CHROMIUM, CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DEMO = ROOT / "demo" / "dataset"  # the --demo page: builtin:toy-sd at 64 px

pytestmark = [pytest.mark.e2e,  # serves the page and trains through a browser
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                 "(apt-get install -y chromium; .ci/run installs it)")]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("browser")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        demo, studio, url = launch_page("--demo", "--outputs", str(root / "outputs"))
        yield url, studio
        demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def set_number(page, field: str, value: int) -> None:
    box = page.locator(f"#field-{field} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def test_a_refused_start_says_why_beside_start_until_the_form_changes(page_url, browser):
    """The form's checks flash at their fields for a moment, often below the fold; the note beside Start says
    why in plain words and stays until the input changes. An emptied dataset folder empties the gallery."""
    from playwright.sync_api import expect

    url, _ = page_url
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    expect(page.locator("#dataset-gallery img")).to_have_count(18)  # the --demo dataset
    set_number(page, "steps", -5)
    page.click("#start")
    note = page.locator("#start-note")
    expect(note).to_contain_text("Not started")
    expect(note).to_contain_text("Steps must be at least 1 (you gave -5).")
    page.wait_for_timeout(3000)  # the field's own message is gone by now; the note is not
    expect(note).to_contain_text("Steps must be at least 1")
    start, shown = page.locator("#start").bounding_box(), note.bounding_box()
    assert shown["y"] - start["y"] < 200 and shown["y"] + shown["height"] < 900  # beside Start, in view
    set_number(page, "steps", 12)
    expect(note).not_to_contain_text("Not started")
    folder = page.locator("#field-dataset_path textarea, #field-dataset_path input").first
    folder.fill("")
    folder.press("Tab")
    expect(page.locator("#dataset-gallery img")).to_have_count(0)
    expect(page.locator("#dataset-report")).not_to_contain_text("18 images")
    page.click("#start")
    expect(note).to_contain_text("Dataset folder is empty")
    assert studio_is_idle(page_url[1])
    page.close()


def studio_is_idle(studio) -> bool:
    return studio.view().state == "idle" and not studio.queued()


def test_upload_train_watch_download_then_stop_a_second_job(page_url, browser, tmp_path):
    from playwright.sync_api import expect

    url, studio = page_url
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    page.goto(url)

    page.set_input_files("#upload input[type=file]", [str(path) for path in sorted(DEMO.iterdir())])
    expect(page.locator("#dataset-report")).to_contain_text("uploads", timeout=30_000)
    expect(page.locator("#dataset-report")).to_contain_text("18 images")
    expect(page.locator("#dataset-gallery img")).to_have_count(18)
    # the --demo form had the demo's dataset: its trigger words go, said in the report, and are asked for again
    expect(page.locator("#dataset-report")).to_contain_text("Cleared the trigger words")
    words = page.locator("#field-trigger_words textarea, #field-trigger_words input").first
    expect(words).to_have_value("")
    words.fill("zwx")
    words.press("Tab")

    set_number(page, "steps", 12)  # the demo preset with a shorter run, to keep the test quick
    set_number(page, "checkpoint_steps", 6)
    page.locator("#group-sampling").get_by_text("Samples").first.click()
    set_number(page, "validation_steps", 6)
    set_number(page, "sample_inference_steps", 4)
    page.click("#start")
    status = page.locator("#run-status")
    expect(status).to_have_attribute("data-state", "complete", timeout=120_000)
    expect(status).to_contain_text("step 12 / 12 · 100 %")
    expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
    first_sample = page.locator("#samples img").first
    expect(first_sample).to_be_visible()
    assert first_sample.evaluate("img => img.complete && img.naturalWidth") == 64  # the toy model's size
    expect(page.locator("#checkpoints a[href$='/lora_step_6.safetensors']")).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "webui-finished.png"))
    page.screenshot(path=str(ARTIFACTS / "webui-finished-full.png"), full_page=True)

    with page.expect_download() as download:
        page.click("#download-final")
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    final = Path(studio.view().final_path)
    assert download.value.suggested_filename == "lora_final.safetensors"
    assert saved.read_bytes() == final.read_bytes()

    page.reload()  # a reopened page shows the finished job, and its settings
    expect(page.locator("#run-status")).to_have_attribute("data-state", "complete")
    expect(page.locator("#field-steps input[type=number]")).to_have_value("12")
    expect(page.locator("#field-dataset_path textarea, #field-dataset_path input").first).to_have_value(
        re.compile(r"/uploads/"))

    set_number(page, "steps", 5000)
    page.click("#start")
    expect(status).to_have_attribute("data-state", "running", timeout=60_000)
    expect(status).to_contain_text(re.compile(r"step ([3-9]|\d\d+) / 5000"), timeout=60_000)
    page.click("#stop")
    expect(status).to_have_attribute("data-state", "stopped", timeout=60_000)
    step = int(status.get_attribute("data-step"))
    assert 0 < step < 5000
    expect(page.locator(f"#checkpoints a[href$='/lora_step_{step}.safetensors']")).to_have_count(1)
    assert Path(studio.view().checkpoints[-1][1]).is_file()
    page.screenshot(path=str(ARTIFACTS / "webui-stopped.png"), full_page=True)
    page.close()
