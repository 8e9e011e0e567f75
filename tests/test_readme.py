"""The README stays true: the option table is the model's, and CI runs the README's test command."""

import re

from helpers import ROOT

from lora_core.config import options_table

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_option_table_is_generated_from_the_model():
    block = README.split("<!-- options:start -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert block == options_table(), "README option table is stale: run `python -m lora_core readme`"


def test_ci_runs_the_readme_test_command_word_for_word():
    commands = re.findall(r"^(python3 -m venv .*)$", README, flags=re.MULTILINE)
    assert len(commands) == 2, "the quick start has two commands: run the demo, run the tests"
    demo, tests = commands
    assert "webui.py --demo" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()


def test_every_event_type_is_documented():
    from lora_core import events

    types = {cls.type for cls in vars(events).values()
             if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event}
    for event_type in types:
        assert f"| `{event_type}` |" in README, event_type


def test_every_event_field_is_in_its_row_of_the_event_table():
    import dataclasses

    from lora_core import events

    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines() if line.startswith("| `")}
    for cls in vars(events).values():
        if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event:
            for field in dataclasses.fields(cls):
                if field.name != "timestamp":  # every event has it, as the text above the table says
                    assert f"`{field.name}`" in rows[cls.type], (cls.type, field.name)
