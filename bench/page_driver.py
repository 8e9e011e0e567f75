"""Driving the studio's page in a real browser: the one place that says which Chromium runs and how a form field
and a dropdown are filled. The browser tests (tests/test_*_browser.py) and the README's pictures
(bench/docs_shots.py) both use it, so a page change that moves a field is mended once."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browsers are a download this machine lacks
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
                 "--no-first-run"]


def fill(page, field: str, value) -> None:
    """Type `value` into the form field of config field `field` (#field-NAME) and leave it, as a person does."""
    box = page.locator(f"#field-{field} input[type=number], #field-{field} textarea, "
                       f"#field-{field} input[type=text]").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, elem_id: str, value: str) -> None:
    """Type a value into a Gradio dropdown (custom values allowed) and take it."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
