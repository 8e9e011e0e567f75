"""`python -m bench.docs_shots`: the README's pictures of the page, from a real run of the built-in demo.

The one way docs/webui.png, docs/runs.png and docs/grid.png are made. It starts the page (`webui.py --demo`)
on a scratch outputs folder in this process, opens it in Playwright with Debian's Chromium
(/usr/bin/chromium, `apt-get install -y chromium`), and through the page, as a person would:

1. trains the demo preset with 0.3 x its learning rate, run `demo-lr3e-4`, so that the Runs tab lists two
   runs (`--one-run` skips it);
2. trains the demo preset itself (presets/demo-toy-cpu.json: `builtin:toy-sd` learns the colour magenta for
   the word "zwx", 120 steps, 3 of the 18 pictures held out) with a checkpoint every 30 steps, run `demo`,
   and shoots the Train tab, which follows the server's last job: the finished run, its loss curve, its
   samples turning magenta, its checkpoints (docs/webui.png);
3. opens `demo` in the Runs tab and scores it (Score this run), then shoots the tab: the two runs, the
   opened run's training and held-out loss and samples by step, its recommended checkpoint and strength, the
   scores' curves and table (docs/runs.png; the file downloads between samples and scores are left out);
4. makes a grid of the run's checkpoints (rows) by the demo's two sample prompts and one prompt without the
   trigger word (columns), and shoots that section (docs/grid.png).

The jobs train with one OpenMP thread (OMP_NUM_THREADS=1 unless set). Every seed is fixed (the preset's 42,
the scores' and the grid's own), so a rerun draws the same pictures; the timings and dates shown differ. The
PNGs are written with 256 colours, tens of KB each. About 2 minutes on this project's two-core machine at a
load average of 3 (1 min 40 s on 2026-12-07), longer on a busier one. Remake the pictures after a change to
the page or the demo, look at them, and commit them:

    python -m bench.docs_shots                 # writes docs/webui.png, docs/runs.png, docs/grid.png
    python -m bench.docs_shots --out /tmp/shots --work /tmp/shots-work   # elsewhere, the runs kept there
    python -m bench.docs_shots --out /tmp/shots --work /tmp/shots-work   # again: reshoots those runs, no training

The tests never write docs/: tests/test_studio_browser.py keeps its own screenshots in test-artifacts/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.page_driver import CHROMIUM, CHROMIUM_ARGS, choose, fill

ROOT = Path(__file__).resolve().parent.parent
VIEWPORT = {"width": 1200, "height": 1000}  # the page's column at 960 px: readable at the README's width
GRID_VIEWPORT = {"width": 1400, "height": 1000}
WAIT_MS = 1_500_000  # a training, score or grid on a busy two-core machine
RUN = "demo"
SECOND_RUN = "demo-lr3e-4"
DEMO_LEARNING_RATE = json.loads((ROOT / "presets" / "demo-toy-cpu.json").read_text())["training_params"][
    "learning_rate"]  # 1e-3; the second run trains at 0.3 x that
CHECKPOINT_STEPS = 30
GRID_PROMPTS = ["a zwx circle on a black background", "a zwx square on a white background",
                "a circle on a black background"]  # the last without the trigger: does the colour bleed?
GAP = 12  # pixels between the two parts of runs.png


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.docs_shots", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs (default docs/)")
    parser.add_argument("--work", type=Path, help="folder for the runs, kept; given again, its finished runs "
                        "and scores are reused (default: a temporary one, removed at the end)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--one-run", action="store_true",
                        help=f"skip the second run ({SECOND_RUN}) that the Runs tab lists beside {RUN}")
    return parser.parse_args(argv)


def launch_page(outputs: Path) -> tuple:
    """`python webui.py --demo --outputs OUTPUTS` as a server in this process, on a free port."""
    import webui

    demo, studio, settings = webui.make_app(webui.parse_args(["--demo", "--outputs", str(outputs)]))
    settings.pop("server_port")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **settings)
    return demo, studio, url.rstrip("/")


def say(text: str, started: float) -> None:
    print(f"[{time.monotonic() - started:5.0f} s] {text}", flush=True)


def train(page, outputs: Path, run: str, **fields) -> None:
    """Start a run from the Train tab's form (the demo preset, with `fields` changed) and wait for its end;
    a run already finished in the outputs folder (`--work` again) is kept."""
    from playwright.sync_api import expect

    if (outputs / run / "lora_final.safetensors").exists():  # a rerun of the script with --work
        return
    page.get_by_role("tab", name="Train").click()
    for name, value in {"run_name": run, "checkpoint_steps": CHECKPOINT_STEPS, **fields}.items():
        fill(page, name, value)
    expect(page.locator("#run-folder")).to_contain_text(run)
    page.click("#start")
    status = page.locator("#run-status")
    # the live view still shows the previous run's end until the page's poll sees this one start
    expect(status).to_have_attribute("data-state", re.compile("starting|running"), timeout=120_000)
    expect(status).to_contain_text(run)
    expect(status).to_have_attribute("data-state", re.compile("complete|failed|stopped"), timeout=WAIT_MS)
    if status.get_attribute("data-state") != "complete":
        raise SystemExit(f"run {run} did not complete: {status.inner_text()}")


def shoot_train(page, path: Path) -> None:
    """The Train tab from its title down to the live view's checkpoints."""
    from playwright.sync_api import expect

    expect(page.locator("#samples img").first).to_be_visible()
    expect(page.locator("#model-family")).to_contain_text("Detected", timeout=120_000)  # a child process reads it
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(2)  # the loss plot and the gallery's images finish drawing
    tab = page.locator("#tab-train").first.bounding_box()
    end = page.locator("#checkpoints").first.bounding_box()
    clip(page, path, {**tab, "y": 0}, end)  # from the page's title and tabs


def clip(page, path: Path, first: dict, last: dict) -> None:
    """A screenshot of the page from `first`'s top to `last`'s bottom, `first`'s width (boxes as Playwright
    gives them: in the viewport's pixels)."""
    scrolled = page.evaluate("window.scrollY")
    height = last["y"] + last["height"] - first["y"]
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": first["x"], "y": first["y"] + scrolled, "width": first["width"], "height": height})


def open_run(page, run: str) -> None:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Runs").click()
    page.click("#runs-refresh")
    expect(page.locator("#runs-table")).to_contain_text(run)
    choose(page, "runs-pick", run)
    page.click("#runs-open")
    expect(page.locator("#run-summary")).to_contain_text(f"{run}: complete")


def score(page, outputs: Path, run: str) -> None:
    """Score the opened run (unless it was scored in an earlier try) and wait for its scores."""
    from playwright.sync_api import expect

    if (outputs / run / "scores.json").exists():
        return
    page.click("#score-run")
    status = page.locator("#score-status")
    expect(status).to_contain_text(f"Score of {run}")
    expect(status).to_have_attribute("data-state", re.compile("complete|failed"), timeout=WAIT_MS)
    if status.get_attribute("data-state") != "complete":
        raise SystemExit(f"the score of {run} failed: {status.inner_text()}")
    expect(page.locator("#scores-summary")).to_contain_text(f"Scores of {run}")
    expect(page.locator("#scores-plot canvas, #scores-plot svg").first).to_be_visible()


def shoot_runs(page, path: Path, work: Path) -> None:
    """Two parts of the Runs tab, one above the other: the list down to the opened run's samples by step,
    then its scores (recommendation, curves, table); the file downloads between them are left out."""
    from PIL import Image

    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(2)
    box = page.locator("#tab-runs").first.bounding_box
    parts = [work / "runs-top.png", work / "runs-scores.png"]
    clip(page, parts[0], box(), page.locator("#run-samples").first.bounding_box())
    tab = box()
    scores = page.locator("#run-scores").first.bounding_box()
    clip(page, parts[1], {**tab, "y": scores["y"]}, page.locator("#score-progress").first.bounding_box())
    images = [Image.open(part).convert("RGB") for part in parts]
    joined = Image.new("RGB", (images[0].width, sum(image.height for image in images) + GAP), "white")
    joined.paste(images[0], (0, 0))
    joined.paste(images[1], (0, images[0].height + GAP))
    joined.save(path)


def make_grid(page, run: str, path: Path) -> None:
    """Draw the opened run's checkpoints by GRID_PROMPTS and shoot the grid section."""
    from playwright.sync_api import expect

    expect(page.locator("#grid-steps")).to_contain_text("final")
    fill_grid_prompts(page)
    page.click("#grid-make")
    state = page.locator("#sheet-status")
    expect(state).to_have_attribute("data-state", re.compile("complete|failed"), timeout=WAIT_MS)
    if state.get_attribute("data-state") != "complete":
        raise SystemExit(f"the grid of {run} failed: {state.inner_text()}")
    image = page.locator("#sheet-image img").first
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    # wide enough that the grid is shown at its own size: narrower, it is scaled to the box's width and the
    # box's label covers the grid's title
    page.set_viewport_size(GRID_VIEWPORT)
    page.locator("#pick-best").first.scroll_into_view_if_needed()
    time.sleep(1)
    page.locator("#pick-best").first.screenshot(path=str(path))


def fill_grid_prompts(page) -> None:
    box = page.locator("#grid-prompts textarea").first
    box.fill("\n".join(GRID_PROMPTS))
    box.press("Tab")


def shrink(path: Path) -> int:
    """Rewrite a PNG with 256 colours (a screenshot of a page keeps its look) to keep the repository small."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def shoot(url: str, args: argparse.Namespace, work: Path, started: float) -> list[Path]:
    from playwright.sync_api import sync_playwright

    outputs, out = work / "outputs", args.out
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        page.goto(url)
        if not args.one_run:  # first, so that the Train tab shows the demo run, the server's last job
            say(f"training {SECOND_RUN}", started)
            train(page, outputs, SECOND_RUN, learning_rate=DEMO_LEARNING_RATE * 0.3)
        say(f"training {RUN}", started)
        train(page, outputs, RUN, learning_rate=DEMO_LEARNING_RATE)  # the form kept the second run's
        shoot_train(page, out / "webui.png")
        say(f"scoring {RUN}", started)
        open_run(page, RUN)
        score(page, outputs, RUN)
        shoot_runs(page, out / "runs.png", work)
        say(f"drawing the grid of {RUN}", started)
        make_grid(page, RUN, out / "grid.png")
        browser.close()
    return [out / name for name in ("webui.png", "runs.png", "grid.png")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not CHROMIUM.exists():
        raise SystemExit(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-docs-shots-"))
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # the jobs inherit it: on a shared two-core machine two OpenMP threads per job wait on each other (a demo
    # step took 7 s at load 8 with two, about 0.2 s on an idle machine with one)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    demo, studio, url = launch_page(work / "outputs")
    try:
        written = shoot(url, args, work, started)
    finally:
        studio.shutdown(timeout=30)
        demo.close()
        if args.work is None and not args.keep_work:  # only a folder of its own making
            shutil.rmtree(work, ignore_errors=True)
    for path in written:
        print(f"{path}: {shrink(path) // 1024} KB")
    say("done" + (f"; the runs are in {work / 'outputs'}" if args.work or args.keep_work else ""), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
