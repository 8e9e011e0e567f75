#!/usr/bin/env python3
"""Train a Stable Diffusion LoRA from a JSON config; stdout carries JSON-lines events and nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

EXAMPLES = """examples:
  python train_lora.py --config presets/demo-tiny-cpu.json
  python train_lora.py --config my_run.json --validate-only
  python train_lora.py --config my_run.json --resume      # after a stop or crash, or with more steps
  python train_lora.py --config my_run.json --debug 2> train.log | jq -c 'select(.type=="progress")'

events (one JSON object per line on stdout, each with "type" and "timestamp"):
  started, progress, checkpoint, sample, complete, error, interrupted
exit codes: 0 done, 1 failed, 130 stopped by SIGINT, 143 stopped by SIGTERM (a checkpoint is saved)
"""

EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config file (see config_schema.json)")
    parser.add_argument("--validate-only", action="store_true",
                        help="check config, dataset, model, device and memory; print one JSON report; train nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete training state in output_path/checkpoints")
    parser.add_argument("--debug", action="store_true", help="more logging on stderr")
    return parser.parse_args(argv)


class ProgressBar:
    """A one-line human progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.enabled = stream.isatty()

    def show(self, event) -> None:
        if not self.enabled:
            return
        if event.type == "progress":
            filled = int(event.percent / 5)
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {event.step}/{event.total_steps} "
                              f"loss {event.loss:.4f} {event.it_per_s:.2f} it/s eta {event.eta_s:.0f}s ")
        elif event.terminal:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    events_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # whatever a library prints must not corrupt the JSON stream
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    from lora_core.config import ConfigError, load_config
    from lora_core.distributed import is_main_process
    from lora_core.events import Error

    speaks = is_main_process()  # under accelerate/torchrun only the main process writes the JSON stream
    if not speaks:
        events_out = sys.stderr  # the other processes' errors still reach the log

    def send(event) -> None:
        if speaks or event.type == "error":
            events_out.write(event.to_json() + "\n")

    try:
        config = load_config(args.config)
    except ConfigError as error:
        if args.validate_only:
            problems = [{"field": field, "message": message} for field, message in error.problems]
            events_out.write(json.dumps({"ok": False, "problems": problems}) + "\n")
        else:
            send(Error(message=str(error), field=error.field))
        return 1

    if args.validate_only:
        from lora_core.preflight import preflight

        report = preflight(config)
        events_out.write(json.dumps(report) + "\n")
        return 0 if report["ok"] else 1

    from lora_core.worker import Worker

    job = Worker().submit(config, resume=args.resume)
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        job.request_stop()

    for signum in EXIT_FOR_SIGNAL:
        signal.signal(signum, on_signal)
    bar = ProgressBar(sys.stderr)
    terminal = None
    while terminal is None and (job.running or job.terminal is not None):
        for event in job.events(timeout=0.5):  # short waits so signal handlers run promptly
            send(event)
            bar.show(event)
            if event.terminal:
                terminal = event
    job.wait()
    if terminal is None or terminal.type == "error":
        return 1
    if terminal.type == "interrupted":
        return EXIT_FOR_SIGNAL.get(received[0], 143) if received else 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
