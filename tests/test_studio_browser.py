"""The studio in a real browser (Playwright, Debian's Chromium): queue two jobs, watch the first complete and the
second start, open the Runs view, score a run, compare the two runs, make a grid. Screenshots go to
test-artifacts/ (the README's pictures are made from a real demo run by `python -m bench.docs_shots`)."""

from __future__ import annotations

import faulthandler
import re
from pathlib import Path

import pytest
from helpers import launch_page, make_dataset

from bench.page_driver import CHROMIUM, CHROMIUM_ARGS, choose, fill
from studio.scores_view import FIGURE_COLOURS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
WHOLE_TEST_S = 900  # the test's own timeout: a hang dumps every thread's stack and ends the run

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                 "(apt-get install -y chromium)")]


@pytest.fixture
def studio_page(tmp_path, model_cache, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo, studio, url = launch_page("--demo", "--outputs", str(tmp_path / "outputs"))
    faulthandler.dump_traceback_later(WHOLE_TEST_S, exit=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            yield page, studio
            browser.close()
    finally:
        faulthandler.cancel_dump_traceback_later()
        studio.shutdown(timeout=30)
        demo.close()


def keep(page, name: str, locator=None, clip: dict | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    if clip is not None:  # a part of the page: from one element's top to another's bottom
        page.screenshot(path=str(ARTIFACTS / name), clip=clip, full_page=True)
    else:
        (locator or page).screenshot(path=str(ARTIFACTS / name))


def test_queue_two_jobs_then_open_score_compare_and_grid_them_in_the_browser(studio_page, tmp_path):
    from playwright.sync_api import expect

    page, studio = studio_page
    fill(page, "dataset_path", make_dataset(tmp_path / "data", count=2))
    page.locator("#field-dataset_path textarea, #field-dataset_path input").first.press("Enter")  # scan it
    expect(page.locator("#dataset-report")).to_contain_text("2 images")
    for name, value in (("steps", 4), ("checkpoint_steps", 2), ("batch_size", 1), ("resolution", 256)):
        fill(page, name, value)
    page.locator("#group-sampling").get_by_text("Samples").first.click()
    fill(page, "validation_images", "")  # --demo holds out 3 of its pictures; these 2 are all for training
    fill(page, "validation_steps", 4)
    fill(page, "sample_inference_steps", 2)
    fill(page, "sample_prompts", "a zwx red square")  # --demo's trigger word: what scoring measures

    fill(page, "run_name", "first")
    expect(page.locator("#run-folder")).to_contain_text("first")
    page.click("#start")
    status = page.locator("#run-status")
    expect(status).to_have_attribute("data-state", re.compile("starting|running"), timeout=30_000)
    fill(page, "run_name", "second")
    fill(page, "learning_rate", 0.0005)
    fill(page, "resolution", 64)  # the toy model's own size: the scoring of this run draws at it
    page.click("#start")
    queue = page.locator("#queue-table")
    expect(queue).to_contain_text("second")  # one device: the second waits, with its position
    expect(queue).to_contain_text("builtin:toy-sd")  # the queue in words: run, kind, model, steps
    fill(page, "run_name", "third")
    page.click("#start")
    expect(queue).to_contain_text("third")
    choose(page, "queue-pick", "third")
    page.click("#queue-move-up")
    picked = page.locator("#queue-pick input").first
    expect(picked).to_have_value(re.compile(r"^1\. third · train · builtin:toy-sd · 4 steps"))  # moved, kept
    assert Path(studio.queued()[0]["output_path"]).name == "third"
    page.once("dialog", lambda dialog: dialog.accept())  # Cancel asks first
    page.click("#queue-cancel")
    expect(page.locator("#queue-note")).to_contain_text("Cancelled")
    expect(queue).not_to_contain_text("third")
    expect(queue).not_to_contain_text("second", timeout=300_000)  # the first ended, the second started
    runs = studio.outputs_root
    assert "complete" in (runs / "first" / "events.jsonl").read_text()
    expect(status).to_contain_text("second")  # the Train panel follows the job now training...
    expect(status).to_have_attribute("data-state", "complete", timeout=300_000)  # ...to its end

    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    table = page.locator("#runs-table")
    expect(table).to_contain_text("first")
    expect(table).to_contain_text("second")
    choose(page, "runs-pick", "second")
    page.click("#runs-open")
    expect(page.locator("#run-summary")).to_contain_text("second: complete")
    score_and_follow(page, "second")
    choose(page, "runs-pick", "first")
    page.click("#runs-open")
    expect(page.locator("#run-summary")).to_contain_text("first: complete")
    expect(page.locator("#scores-summary")).to_contain_text("Not scored yet")  # each run its own scores
    expect(page.locator("#score-progress")).to_be_empty()
    expect(page.locator("#run-loss canvas, #run-loss svg").first).to_be_visible()
    choose(page, "compare-pick", "first")
    choose(page, "compare-pick", "second")
    page.click("#compare")
    expect(page.locator("#compare-table")).to_contain_text("learning_rate")
    expect(page.locator("#compare-table")).to_contain_text("second")  # a column per run

    expect(page.locator("#grid-steps")).to_contain_text("step 2")  # the opened run's checkpoints, all chosen
    page.click("#grid-make")
    progress = page.locator("#sheet-status")
    expect(progress).to_have_attribute("data-state", "complete", timeout=300_000)
    image = page.locator("#sheet-image img").first
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 256  # one prompt: one column
    assert image.evaluate("img => img.naturalHeight") > 2 * 256  # two checkpoints: two rows
    grids = list((runs / "first").glob("grid_*.png"))
    assert len(grids) == 1  # kept in the run folder, and offered for download
    expect(page.locator(f"#sheet-file a[href$='{grids[0].name}']")).to_have_count(1)
    keep(page, "grid.png", page.locator("#pick-best").first)


def score_and_follow(page, run: str) -> None:
    """Score the opened run: it waits for the device (a long run trains, so this part takes no race with the
    scoring's speed), a second Score is refused while it waits or runs, a page opened then (as a reload is)
    follows it, and when it ends both pages show the scores without a reload."""
    from playwright.sync_api import expect

    expect(page.locator("#scores-summary")).to_contain_text("Not scored yet")
    page.get_by_role("tab", name="Train").click()
    for name, value in (("steps", 5000), ("checkpoint_steps", 5000), ("validation_steps", 5000), ("run_name", "long")):
        fill(page, name, value)
    page.click("#start")
    expect(page.locator("#run-status")).to_have_attribute("data-state", re.compile("starting|running"))
    expect(page.locator("#run-status")).to_contain_text("long")  # it holds the one device from now on
    page.get_by_role("tab", name="Runs").click()
    page.click("#score-run")
    status = page.locator("#score-status")
    expect(status).to_have_attribute("data-state", "queued")
    expect(status).to_contain_text(f"Score of {run}: waiting for the device")
    page.click("#score-run")
    expect(page.get_by_text(f"No score queued: run '{run}' is being scored now")).to_be_visible()
    reloaded = page.context.browser.new_page()  # as a reload: a new page session
    reloaded.goto(page.url)
    expect(reloaded.locator("#queue-table")).to_contain_text(run)  # the queue names the run a score is of
    reloaded.get_by_role("tab", name="Runs").click()
    expect(reloaded.locator("#score-status")).to_contain_text(f"Score of {run}: waiting for the device")
    page.get_by_role("tab", name="Train").click()
    page.click("#stop")  # the device is free: the score starts
    expect(page.locator("#run-status")).to_have_attribute("data-state", "stopped", timeout=60_000)
    page.get_by_role("tab", name="Runs").click()
    for shown in (page, reloaded):
        expect(shown.locator("#score-status")).to_have_attribute("data-state", "complete", timeout=300_000)
        expect(shown.locator("#score-status")).to_contain_text(f"Score of {run}: done")
        expect(shown.locator("#scores-summary")).to_contain_text(f"Scores of {run}")
        expect(shown.locator("#scores-summary")).to_contain_text(re.compile(r"Recommended: step [24]"))
        expect(shown.locator("#scores-summary")).to_contain_text("Measured on 'a zwx red square'")
        expect(shown.locator("#scores-table")).to_contain_text("final (step 4)")  # a row per saved LoRA
        expect(shown.locator("#scores-table")).to_contain_text("step 2")
        expect(shown.locator("#scores-plot canvas, #scores-plot svg").first).to_be_visible()
        drawn = curve_pixels(shown.locator("#scores-plot").first.screenshot(path=str(ARTIFACTS / "scores-plot.png")),
                             FIGURE_COLOURS)
        assert min(drawn.values()) > 300, drawn  # each figure's curve is drawn, not only its legend's dot
    reloaded.close()
    tab = page.locator("#tab-runs").first.bounding_box()
    end = page.locator("#score-progress").first.bounding_box()  # the tab down to the scores, in page pixels
    top = tab["y"] + page.evaluate("window.scrollY")
    keep(page, "runs.png", clip={"x": tab["x"], "y": top, "width": tab["width"],
                                 "height": end["y"] + end["height"] - tab["y"]})


def curve_pixels(png: bytes, colours: dict[str, str]) -> dict[str, int]:
    """How many pixels of a screenshot have each series' colour (within anti-aliasing's reach)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return {name: int((np.abs(pixels - [int(hex_[i:i + 2], 16) for i in (1, 3, 5)]).max(axis=-1) < 40).sum())
            for name, hex_ in colours.items()}
