#!/usr/bin/env python3
"""The container's entrypoint: the web page by default, the training CLI when given a config.

    docker run IMAGE                                       the web page on 0.0.0.0:7860 (the image's CMD)
    docker run IMAGE web [--demo] [--auth user:pass] ...   the web page, with webui.py's options
    docker run IMAGE --config /config/config.json          train_lora.py (any of its options may follow)
    docker run IMAGE train --num-processes 4 --config F    the engine on 4 GPUs through accelerate launch
    docker run IMAGE accelerate launch ... | torchrun ... | python ... | bash   that command, as given

It replaces itself with the command (exec), so the signal `docker stop` sends (through tini, PID 1) reaches
Python directly: the CLI then saves a checkpoint and exits 143. It also records the mode for healthcheck.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent.parent
WEB_SCRIPT, TRAIN_SCRIPT = APP / "webui.py", APP / "train_lora.py"
DEFAULT_HOST, DEFAULT_PORT = "0.0.0.0", "7860"
MODE_FILE = Path(os.environ.get("LORA_STUDIO_MODE_FILE", "/tmp/lora-studio-mode"))


def option_value(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in args, else None."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def without_option(args: list[str], name: str) -> list[str]:
    result, skip = [], False
    for index, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == name:
            skip = index + 1 < len(args)
        elif not arg.startswith(name + "="):
            result.append(arg)
    return result


def web_command(args: list[str], python: str) -> list[str]:
    extra = []
    if option_value(args, "--host") is None:
        extra += ["--host", DEFAULT_HOST]
    if option_value(args, "--port") is None:
        extra += ["--port", os.environ.get("PORT", DEFAULT_PORT)]
    return [python, str(WEB_SCRIPT), *extra, *args]


def train_command(args: list[str], python: str) -> list[str]:
    """The CLI; with --num-processes N (or LORA_STUDIO_NUM_PROCESSES) above 1, under accelerate launch."""
    wanted = option_value(args, "--num-processes") or os.environ.get("LORA_STUDIO_NUM_PROCESSES", "1")
    args = without_option(args, "--num-processes")
    config = option_value(args, "--config")
    if config is None:
        raise SystemExit("train: --config FILE is required (see train_lora.py --help)")
    if wanted == "all":
        from studio.launcher import device_count

        processes = max(1, device_count())
    elif wanted.isdigit() and int(wanted) >= 1:
        processes = int(wanted)
    else:
        raise SystemExit(f"--num-processes: expected a number of GPUs or 'all', got {wanted!r}")
    if processes == 1:
        return [python, str(TRAIN_SCRIPT), *args]
    from studio.launcher import launch_command  # accelerate launch -m lora_core train ...

    rest = without_option(args, "--config")
    return launch_command(config, processes, extra_args=rest, python=python)


def build_command(argv: list[str], python: str = sys.executable) -> tuple[str, list[str]]:
    """(mode, command) for the container's arguments; mode is 'web', 'train' or 'exec'."""
    first = argv[0] if argv else ""
    if first == "web":
        return "web", web_command(argv[1:], python)
    if first == "train":
        return "train", train_command(argv[1:], python)
    if first and not first.startswith("-"):  # accelerate, torchrun, python, bash, tensorboard ...
        return "exec", argv
    if option_value(argv, "--config") is not None:
        return "train", train_command(argv, python)
    return "web", web_command(argv, python)


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(APP))
    mode, command = build_command(argv)
    port = option_value(command, "--port") if mode == "web" else None
    with contextlib.suppress(OSError):  # without it the health check assumes the page on the default port
        MODE_FILE.write_text(f"{mode} {port or ''}".strip() + "\n", encoding="utf-8")
    os.chdir(APP)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
