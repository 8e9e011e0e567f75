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
    python -m lora_core doctor DATASET [--config F] [--trigger W] [--json]   what in a dataset spoils a LoRA
                                        (lora_core/doctor.py; with --events, as the page's job: doctor_job.py)
    python -m lora_core caption DATASET [--model ID] [--overwrite] [--prefix T] ...   caption the images with a
                                        vision-language model (lora_core/captioner.py, caption_model.py; caption -h)
    python -m lora_core ema RUN [--beta B [--beta2 B2] | --sigma-rel S] [--out FILE]   a post-hoc EMA of a run's
                                        checkpoints (lora_core/posthoc_ema.py; ema -h)
    python -m lora_core export-builtin NAME DIR   write a built-in model (e.g. toy-sd) as a diffusers folder
    python -m lora_core rerun RUN OUT [--force]   train a run again from its manifest.json into OUT; refused,
                                        naming them, when its dataset, packages or base model differ (rerun.py)
    python -m lora_core comfyui RUN     (re)write RUN/comfyui_workflow.json for its recommended LoRA (comfyui.py)
"""

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from lora_core.configfile import options_table, write_schema
from lora_core.files import atomic_write_text

START, END = "<!-- options:start -->", "<!-- options:end -->"
Result = int | str | None  # what sys.exit takes

# command -> (module, its `main`'s name, whether that main takes the command's name first). Each command's
# module is imported only when the command runs, so `python -m lora_core schema` never loads torch.
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("lora_core.cli", "main", False),
    **{tool: ("lora_core.loratools", "main", True) for tool in ("inspect", "resize", "merge", "bake")},
    "grid": ("lora_core.grid", "main", True),
    "sweep": ("lora_core.grid", "main", True),
    "score": ("lora_core.scoring", "main", False),
    "ema": ("lora_core.posthoc_ema", "main", False),
    "doctor": ("lora_core.doctor_job", "main", False),  # the report, or with --events the page's job
    "caption": ("lora_core.captioner", "main", False),
    "rerun": ("lora_core.rerun", "main", False),
}


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


def comfyui(run: str) -> Result:
    """`comfyui RUN`: (re)write the run's ComfyUI workflow; print its path."""
    from lora_core.comfyui import write_workflow
    from lora_core.manifest import ManifestError

    try:
        print(write_workflow(run))
    except ManifestError as error:
        return str(error)
    return None


def report(folder: str) -> Result:
    """`report FOLDER`: (re)write its training_report.html; print its path."""
    from lora_core.report import write_report

    written = write_report(folder)
    if written is None:
        return f"no training run recorded in {folder}/events.jsonl"
    print(written)
    return None


# the commands of fixed arity that write files from the model or a run: command -> (argument counts, action)
FILE_COMMANDS: dict[str, tuple[tuple[int, ...], Callable[..., Result]]] = {
    "schema": ((0, 1), lambda path="config_schema.json": write_schema(path)),
    "options": ((0,), lambda: print(options_table())),
    "readme": ((0, 1), lambda path="README.md": write_readme_options(Path(path))),
    "report": ((1,), report),
    "export-builtin": ((2,), export_builtin),
    "comfyui": ((1,), comfyui),
}


def main(argv: list[str]) -> Result:
    """Run the command `argv` (what follows `python -m lora_core`); what `sys.exit` takes."""
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command in COMMANDS:
        module, name, with_command = COMMANDS[command]
        return getattr(importlib.import_module(module), name)(argv if with_command else args)
    if command in FILE_COMMANDS and len(args) in FILE_COMMANDS[command][0]:
        return FILE_COMMANDS[command][1](*args)
    return __doc__


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
