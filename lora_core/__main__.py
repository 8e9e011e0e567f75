"""The engine's commands: training, and the files generated from the configuration model and from a run.

    python -m lora_core train --config F [--resume] [--validate-only] [--debug]
                                        train (see lora_core/cli.py)
    python -m lora_core schema [PATH]   regenerate config_schema.json
    python -m lora_core options         print the README's option table (Markdown)
    python -m lora_core readme [PATH]   rewrite the option table between README.md's options markers
    python -m lora_core report FOLDER   (re)write FOLDER/training_report.html from its events.jsonl
    python -m lora_core grid RUN ...    checkpoints x prompts image grid (see lora_core/grid.py, or grid -h)
    python -m lora_core sweep RUN ...   one LoRA at several strengths (see lora_core/grid.py, or sweep -h)
    python -m lora_core score RUN [--device D]   score every saved LoRA of a run into RUN/scores.json, with a
                                        recommended checkpoint and strength (see lora_core/scoring.py)
    python -m lora_core inspect | resize | merge | bake ...   the LoRA tools (lora_core/loratools.py; --help)
    python -m lora_core doctor DATASET [--config F] [--json]   what in a dataset spoils a LoRA (lora_core/doctor.py)
    python -m lora_core caption DATASET [--model ID] [--overwrite] [--prefix T] ...   caption the images with a
                                        vision-language model (lora_core/captioner.py, caption_model.py; caption -h)
    python -m lora_core export-builtin NAME DIR   write a built-in model (e.g. toy-sd) as a diffusers folder
"""

import sys
from pathlib import Path

from lora_core.configfile import options_table, write_schema
from lora_core.files import atomic_write_text

START, END = "<!-- options:start -->", "<!-- options:end -->"


def write_readme_options(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    atomic_write_text(path, f"{head}{START}\n{options_table()}\n{END}{tail}")


def export_builtin(name: str, target: str) -> None:
    """`export-builtin NAME DIR`: print the folder written, or exit with why nothing was."""
    from lora_core import builtin

    try:
        print(builtin.export(name, Path(target).resolve()))
    except KeyError:
        sys.exit(f"unknown built-in model '{name}'; choose one of {', '.join(builtin.names())}")
    except (FileExistsError, FileNotFoundError) as error:
        sys.exit(str(error))


def main(argv: list[str]) -> int | str | None:
    """Run the command `argv` (what follows `python -m lora_core`); what `sys.exit` takes."""
    command = argv[0] if argv else ""
    if command == "train":
        from lora_core.cli import main as train

        return train(argv[1:])
    if command in ("inspect", "resize", "merge", "bake"):
        from lora_core.loratools import main as tool

        return tool(argv)
    if command in ("grid", "sweep"):
        from lora_core.grid import main as draw

        return draw(argv)
    if command == "score":
        from lora_core.scoring import main as score

        return score(argv[1:])
    if command == "doctor":
        from lora_core.doctor import main as doctor

        return doctor(argv[1:])
    if command == "caption":
        from lora_core.captioner import main as caption

        return caption(argv[1:])
    if command == "schema":
        write_schema(argv[1] if len(argv) > 1 else "config_schema.json")
    elif command == "options":
        print(options_table())
    elif command == "readme":
        write_readme_options(Path(argv[1] if len(argv) > 1 else "README.md"))
    elif command == "report" and len(argv) == 2:
        from lora_core.report import write_report

        written = write_report(argv[1])
        if written is None:
            return f"no training run recorded in {argv[1]}/events.jsonl"
        print(written)
    elif command == "export-builtin" and len(argv) == 3:
        export_builtin(argv[1], argv[2])
    else:
        return __doc__
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
