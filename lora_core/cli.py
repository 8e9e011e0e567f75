"""`python -m lora_core train`: the engine's own entry point (a face's training command is a shim over it).

The job runs on the main thread; SIGTERM and SIGINT only set the stop flag that the training loop reads
after each step, so a stop always ends with a checkpoint and an `interrupted` event. stdout carries the
JSON-lines events and nothing else (whatever a library prints goes to stderr, with the logs).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TextIO

from lora_core.events import Event, ValidationReport

DESCRIPTION = "Train a Stable Diffusion LoRA from a JSON config; stdout carries JSON-lines events and nothing else."
PROG = "python -m lora_core train"
EXAMPLES = """examples:
  {prog} --config presets/demo-toy-cpu.json
  {prog} --config my_run.json --validate-only
  {prog} --config my_run.json --resume      # after a stop or crash, or with more steps
  {prog} --config my_run.json --debug 2> train.log | jq -c 'select(.type=="progress")'

events (one JSON object per line on stdout, each with "type" and "timestamp"):
  started, progress, checkpoint, sample, complete, error, interrupted; validation_report for --validate-only
exit codes: 0 done, 1 failed, 130 stopped by SIGINT, 143 stopped by SIGTERM (a checkpoint is saved)
"""

EXIT_FOR_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
log = logging.getLogger("lora_core.cli")


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES.format(prog=prog),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config file (see config_schema.json)")
    parser.add_argument("--validate-only", action="store_true",
                        help="check config, dataset, model, device and memory; print one validation_report "
                             "event; train nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete training state in output_path/checkpoints")
    parser.add_argument("--debug", action="store_true", help="more logging on stderr")
    return parser.parse_args(argv)


class ProgressBar:
    """A one-line human progress bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.enabled = stream.isatty()

    def show(self, event: Event) -> None:
        if not self.enabled:
            return
        if event.type == "progress":
            filled = int(event.percent / 5)
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {event.step}/{event.total_steps} "
                              f"loss {event.loss:.4f} {event.it_per_s:.2f} it/s eta {event.eta_s:.0f}s ")
        elif event.terminal:
            self.stream.write("\n")
        self.stream.flush()


class StopFlag:
    """Set by SIGTERM/SIGINT; remembers the first signal for the exit code."""

    def __init__(self):
        self.signals: list[int] = []

    def __call__(self) -> bool:
        return bool(self.signals)

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.signals:
            log.warning("signal %s: stopping after the current step (a checkpoint is saved)", signum)
        self.signals.append(signum)

    def install(self) -> None:
        for signum in EXIT_FOR_SIGNAL:
            signal.signal(signum, self.on_signal)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command line `argv` (default: sys.argv); the exit code. `prog` names the command in --help."""
    args = parse_args(argv, prog)
    events_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # whatever a library prints must not corrupt the JSON stream
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    stop = StopFlag()
    stop.install()  # before anything slow: a stop during loading still ends with one final event

    from lora_core.config import ConfigError
    from lora_core.configfile import load_config
    from lora_core.distributed import is_main_process
    from lora_core.events import Error

    speaks = is_main_process()  # under accelerate/torchrun only the main process writes the JSON stream
    bar = ProgressBar(sys.stderr)

    def send(event: Event) -> None:
        if speaks:
            events_out.write(event.to_json() + "\n")
            bar.show(event)
        elif event.type == "error":  # the other processes' errors still reach the log
            sys.stderr.write(event.to_json() + "\n")
        if event.type == "error":
            log.error("%s%s", f"{event.field}: " if event.field else "", event.message)

    if args.validate_only:
        report = validate(args.config)
        send(report)
        return 0 if report.ok else 1
    try:
        config = load_config(args.config)
    except ConfigError as error:
        send(Error(message=str(error), field=error.field))
        return 1

    from lora_core.job import run_job
    from lora_core.scoring import score_at_end

    terminal = run_job(config, send, stop, resume=args.resume, at_end=score_at_end if config.score_at_end else None)
    return exit_code(terminal, stop.signals)


def validate(config_path: str) -> ValidationReport:
    """--validate-only's answer for a config file: the config's problems, or the run plan's report (which
    checks dataset, model, device, memory and output folder as training would)."""
    from lora_core.config import ConfigError
    from lora_core.configfile import load_config

    try:
        config = load_config(config_path)
    except ConfigError as error:
        return ValidationReport(ok=False, problems=[{"field": field, "message": message}
                                                    for field, message in error.problems])
    from lora_core.plan import plan_report  # torch: only once the config itself is sound

    return ValidationReport.from_report(plan_report(config))


def exit_code(terminal: Event, signals: list[int]) -> int:
    if terminal.type == "complete":
        return 0
    if terminal.type == "interrupted":
        return EXIT_FOR_SIGNAL.get(signals[0], 143) if signals else 143
    return 1
