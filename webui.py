#!/usr/bin/env python3
"""LoRA Studio: a web page over lora_core that trains a Stable Diffusion LoRA in the background.

The page only builds configs, asks the process's `Studio` (studio/jobs.py) to start or stop a job, and
polls what the job reports. Every job is a child process of its own (`python -m lora_core train`), so
closing the tab does not stop training, any page opened later shows the running or finished job, and a
restarted server finds a job that is still training and shows it again. This file parses the flags, sets up
the login and launches; the page is studio/train_tab.py (the Train tab) and studio/runs_page.py (Runs).

    python webui.py                 # http://127.0.0.1:7860
    python webui.py --demo          # the form pre-filled with the tiny CPU demo
    python webui.py --host 0.0.0.0 --auth me:secret
    python webui.py --detach-jobs   # on SIGTERM, leave running jobs training (a later server finds them)
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from lora_core.configfile import load_config
from studio import auth
from studio.jobs import Studio
from studio.render import CSS
from studio.train_form import DEMO_PRESET, ROOT, PageSettings, default_form
from studio.train_tab import build_app
from studio.uploads import UploadLimits

log = logging.getLogger("webui")

OUTPUTS_ENV, AUTH_ENV, DATASETS_ENV = "LORA_STUDIO_OUTPUTS", "LORA_STUDIO_AUTH", "LORA_STUDIO_DATASETS"
DEMO_RUN_NAME = "demo-page"  # then demo-page-2, ...: a fresh numbered folder per run (Studio.next_folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio web page", epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; 0.0.0.0 serves the network: use --auth)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--auth", default=os.environ.get(AUTH_ENV),
                        help=f"require a login, user:password (several: comma-separated); or set {AUTH_ENV}")
    parser.add_argument("--demo", action="store_true",
                        help="pre-fill the CPU demo (presets/demo-toy-cpu.json: teaches builtin:toy-sd a new colour)")
    parser.add_argument("--outputs", default=os.environ.get(OUTPUTS_ENV, "outputs"),
                        help=f"folder for runs and uploads (default ./outputs, or {OUTPUTS_ENV})")
    parser.add_argument("--gpus", default=os.environ.get("LORA_STUDIO_GPUS", "1"),
                        help="GPUs per job: a number, or 'all'; more than one trains through accelerate launch")
    parser.add_argument("--detach-jobs", action="store_true",
                        help="on SIGTERM/Ctrl-C leave running jobs training instead of stopping them with a "
                             "checkpoint; a server started later shows them again")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest single uploaded file (MB)")
    parser.add_argument("--max-upload-files", type=int, default=2000, help="most images + captions per upload")
    return parser.parse_args(argv)


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SystemExit(f"--auth / {AUTH_ENV}: expected user:password, got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


def launch_settings(args: argparse.Namespace, studio: Studio) -> dict[str, Any]:
    """Everything `Blocks.launch` gets: safe defaults, and only the outputs folder served."""
    return dict(server_name=args.host, server_port=args.port, share=args.share, auth=parse_auth(args.auth),
                auth_message="LoRA Studio: log in to train.", max_file_size=f"{args.max_upload_mb}mb",
                allowed_paths=[str(studio.outputs_root)], enable_monitoring=False, ssr_mode=False,
                show_error=False, css=CSS, app_kwargs={"middleware": [auth.middleware()]})


def exposure_warning(args: argparse.Namespace) -> str | None:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        return (f"serving on {args.host} without a login: anyone who can reach port {args.port} can train on "
                f"this machine and download the results; add --auth user:password (or set {AUTH_ENV})")
    if args.share and not args.auth:
        return f"a public share link without a login; add --auth user:password (or set {AUTH_ENV})"
    return None


def make_app(args: argparse.Namespace) -> tuple[gr.Blocks, Studio, dict[str, Any]]:
    studio = Studio(args.outputs, processes=args.gpus if args.gpus == "all" else int(args.gpus))
    config = load_config(DEMO_PRESET) if args.demo else None
    initial = default_form(config)
    if args.demo:  # the page's demo runs get a folder of their own: the README's headless demo writes outputs/demo
        initial["dataset_path"], initial["run_name"] = str(ROOT / "demo" / "dataset"), DEMO_RUN_NAME
    datasets_root = os.environ.get(DATASETS_ENV)
    settings = PageSettings(initial, UploadLimits(max_files=args.max_upload_files,
                                                  max_file_bytes=args.max_upload_mb * 1024**2),
                            Path(datasets_root).resolve() if datasets_root else None)
    demo = build_app(studio, settings)
    demo.queue(default_concurrency_limit=2, max_size=None)  # a bounded queue let polls crowd out Stop
    return demo, studio, launch_settings(args, studio)


def main(argv: list[str] | None = None, launch: Callable[..., Any] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if warning := exposure_warning(args):
        log.warning(warning)
    demo, studio, settings = make_app(args)
    log.info("runs and uploads go to %s", studio.outputs_root)
    install_signal_handlers(studio, detach_jobs=args.detach_jobs)
    (launch or demo.launch)(**settings)


def install_signal_handlers(studio: Studio, detach_jobs: bool = False) -> None:
    """SIGTERM (docker stop, a Space restart) or Ctrl-C: let running jobs save a checkpoint (or, with
    `detach_jobs`, leave them training), then exit at once: docker stop waits only 10 s."""
    import signal

    def stop(signum, _frame) -> None:
        if detach_jobs:
            log.warning("signal %s: exiting; running jobs go on training (%s)", signum,
                        ", ".join(studio.running()) or "none")
        else:
            log.warning("signal %s: stopping running jobs after their current step, then exiting", signum)
        studio.shutdown(timeout=8.0, stop_jobs=not detach_jobs)
        logging.shutdown()
        os._exit(128 + signum)  # not sys.exit: closing the HTTP server and its threads takes seconds

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


if __name__ == "__main__":
    main()
