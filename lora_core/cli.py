"""`python -m lora_core train`: the engine's own entry point (a face's training command is a shim over it).

The job runs on the main thread, wrapped as every tool's job is (lora_core/job.py `run_command`): SIGTERM and
SIGINT only set the stop flag that the training loop reads after each step, so a stop always ends with a
checkpoint and an `interrupted` event. stdout carries the JSON-lines events and nothing else (whatever a
library prints goes to stderr, with the logs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command line `argv` (default: sys.argv); the exit code. `prog` names the command in --help.
    Training is a job like every tool: job.run_command gives it its stdout, its stop signals, its one final
    event and its exit status; only the progress bar (`show`) and --validate-only are training's own."""
    args = parse_args(argv, prog)
    from lora_core.job import run_command

    if args.validate_only:
        return run_command(lambda emit, should_stop: emit(validate(args.config)),
                           lambda report: 0 if getattr(report, "ok", False) else 1, log_events=False, debug=args.debug)
    return run_command(lambda emit, should_stop: train(args.config, args.resume, emit, should_stop),
                       lambda event: 0 if event.type == "complete" else None, log_events=False,
                       show=ProgressBar(sys.stderr).show, debug=args.debug)


def train(config_path: str, resume: bool, emit: Callable[[Event], None], should_stop: Callable[[], bool]) -> None:
    """The training job's work: the config file read (its mistake is one `error` at its field), then run_job,
    which writes the run folder's events.jsonl and takes its lock itself."""
    from lora_core.config import ConfigError
    from lora_core.configfile import load_config
    from lora_core.events import Error

    try:
        config = load_config(config_path)
    except ConfigError as error:
        emit(Error(message=str(error), field=error.field))
        return
    from lora_core.job import run_job
    from lora_core.scoring import score_at_end

    run_job(config, emit, should_stop, resume=resume, at_end=score_at_end if config.score_at_end else None)


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
