"""`python -m lora_core rerun RUN OUT [--force]`: train a run again, from its manifest, into a new folder.

The run's manifest (manifest.py) says what it was made of. Before anything trains, the dataset folders are hashed
again and the packages and base model looked at: a file changed, missing or new, a package at another version or
another base model is a difference, and the rerun is refused with each one named (exit 1, one `error` event),
unless `--force`, which says the differences (a `warning` event and the log) and trains anyway. A different
device or project commit is only said: it may change the last bits of the result, and may be the point.

On the same machine, with the same packages and data, the rerun's LoRA is bit-identical to the original's
(tests/test_handover.py checks it): training is seeded everywhere it draws (noise, levels, dropout, batch order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from lora_core import manifest

log = logging.getLogger("lora_core.rerun")


class RerunRefused(ValueError):
    field = "run"


def differences(recorded: dict[str, Any], now: dict[str, Any] | None = None) -> dict[str, Any]:
    """What differs between the recorded run and this machine now: `datasets` (per field: changed / missing / new
    files), `packages` (name -> [recorded, now]), `base_model` (in words, or None), and `notes` (device and commit
    differences, which do not refuse a rerun). `now`: the current state where the caller has it (tests)."""
    now = now if now is not None else current_state(recorded)
    datasets = {}
    for field, entry in recorded.get("datasets", {}).items():
        files = manifest.file_differences(entry.get("files", {}), now["datasets"].get(field, {}))
        if any(files.values()):
            datasets[field] = {"folder": entry.get("folder"), **files}
    packages = {name: [version, now["packages"].get(name)] for name, version in recorded.get("packages", {}).items()
                if now["packages"].get(name) != version}
    base = None if now["base_model"] == recorded.get("base_model") else (
        f"the base model {recorded.get('base_model', {}).get('name')} is not what it was "
        f"(recorded {_short(recorded.get('base_model'))}, now {_short(now['base_model'])})")
    notes = []
    device_then, device_now = recorded.get("device", {}), now.get("device", {})
    for key in ("gpu", "cpu", "driver", "cuda"):
        if device_then.get(key) != device_now.get(key) and (device_then.get(key) or device_now.get(key)):
            notes.append(f"device {key}: {device_then.get(key)} then, {device_now.get(key)} now")
    commit_then, commit_now = (recorded.get("git") or {}).get("commit"), (now.get("git") or {}).get("commit")
    if commit_then != commit_now:
        notes.append(f"project commit: {commit_then} then, {commit_now} now")
    return {"datasets": datasets, "packages": packages, "base_model": base, "notes": notes}


def _short(identity: Any) -> str:
    return json.dumps(identity, sort_keys=True)[:200]


def current_state(recorded: dict[str, Any]) -> dict[str, Any]:
    """The same facts as the manifest records, measured now: the recorded dataset folders hashed again, the
    installed packages, the base model's identity (a hub model's configs only, from the cache or the hub)."""
    from lora_core import models

    try:
        source = models.resolve(str(recorded["config"]["base_model"]), configs_only=True)
        base: Any = manifest.base_model_identity(source)
    except Exception as error:  # a model that cannot be reached is a difference, said as such
        base = {"unreachable": str(error)}
    return {"datasets": {field: manifest.folder_hashes(entry.get("folder", ""))
                         for field, entry in recorded.get("datasets", {}).items()},
            "packages": manifest.package_versions(), "base_model": base,
            "device": manifest.device_info(_recorded_device(recorded)), "git": manifest.git_commit()}


def _recorded_device(recorded: dict[str, Any]) -> str:
    return str(recorded.get("device", {}).get("type", "cpu"))


def blocking(found: dict[str, Any]) -> bool:
    return bool(found["datasets"] or found["packages"] or found["base_model"])


def describe(found: dict[str, Any]) -> list[str]:
    """The differences as lines for people."""
    lines = []
    for field, entry in found["datasets"].items():
        for kind in ("changed", "missing", "new"):
            if entry[kind]:
                shown = ", ".join(entry[kind][:20]) + (f" and {len(entry[kind]) - 20} more" if len(entry[kind]) > 20
                                                       else "")
                lines.append(f"{field} ({entry['folder']}): {kind} {shown}")
    for name, (then, now) in found["packages"].items():
        lines.append(f"package {name}: {then} then, {now} now")
    if found["base_model"]:
        lines.append(found["base_model"])
    return lines


def prepare(run_folder: str | Path, output: str | Path, force: bool = False) -> tuple[Any, list[str]]:
    """The config to train again into `output`, and the differences said (forced past); RerunRefused naming them
    when there are any and not `force`."""
    from lora_core.configfile import parse_config

    recorded = manifest.read(run_folder)
    if Path(output).resolve() == Path(run_folder).resolve():
        raise RerunRefused(f"{output} is the run itself; name a new folder for the rerun")
    found = differences(recorded)
    said = describe(found)
    if blocking(found) and not force:
        raise RerunRefused(f"{run_folder} cannot be trained again as it was: " + "; ".join(said)
                           + ". Restore them, or pass --force to train anyway")
    config = parse_config({**recorded["config"], "output_path": str(output)})
    return config, said + found["notes"]


def page_config(run_folder: str | Path) -> Any:
    """The config the page's Rerun submits (its output folder is the run's; the queue picks a fresh one beside
    it), after the torch-free checks: the dataset files and packages against the manifest. RerunRefused names what
    differs (the base model is checked by the command line, which may load torch)."""
    from lora_core.configfile import parse_config

    recorded = manifest.read(run_folder)
    now = {"datasets": {field: manifest.folder_hashes(entry.get("folder", ""))
                        for field, entry in recorded.get("datasets", {}).items()},
           "packages": manifest.package_versions(), "base_model": recorded.get("base_model")}
    found = differences(recorded, now)
    if blocking(found):
        raise RerunRefused("; ".join(describe(found)) + ". Restore them, or train again from the command line "
                           "with `python -m lora_core rerun RUN OUT --force`")
    return parse_config({**recorded["config"], "output_path": str(run_folder)})


def main(argv: list[str]) -> int:
    """`rerun RUN OUT [--force]`: the rerun's events on stdout, as `train`'s; exit 1 when refused."""
    parser = argparse.ArgumentParser(prog="python -m lora_core rerun", description=(
        "Train a run again from its manifest.json into a new folder; refused, with the differences named, "
        "when its dataset files, packages or base model are no longer what they were."))
    parser.add_argument("run", help="the run folder (with manifest.json)")
    parser.add_argument("output", help="a new folder for the rerun")
    parser.add_argument("--force", action="store_true", help="say the differences, then train anyway")
    args = parser.parse_args(argv)
    from lora_core.config import ConfigError
    from lora_core.events import Error, RunWarning

    try:
        config, said = prepare(args.run, args.output, args.force)
    except (manifest.ManifestError, RerunRefused, ConfigError) as error:
        print(Error(message=str(error), field=getattr(error, "field", "run")).to_json(), flush=True)
        print(f"rerun refused: {error}", file=sys.stderr)
        return 1
    if said:
        message = "training again despite these differences: " + "; ".join(said)
        print(RunWarning(message=message, field="run").to_json(), flush=True)
        log.warning("%s", message)
        print(message, file=sys.stderr)
    code = _train(config)
    if code == 0:
        _compare_result(Path(args.run), Path(config.output_path))
    return code


def _compare_result(run_folder: Path, output: Path) -> bool | None:
    """Record in the rerun's manifest what it reran (`rerun_of`) and whether its final LoRA's tensors are the
    original's (their SHA-256), and say so on stderr; None when either hash is unknown."""
    try:
        before = manifest.read(run_folder).get("final_lora", {}).get("tensors_sha256")
        recorded = manifest.read(output)
    except manifest.ManifestError:
        return None
    after = recorded.get("final_lora", {}).get("tensors_sha256")
    same = None if not (before and after) else before == after
    recorded["rerun_of"] = {"run": str(run_folder.resolve()), "identical_lora": same}
    with contextlib.suppress(OSError):  # the rerun's result stands without this note
        manifest.write(output, recorded)
    said = {True: "bit-identical to", False: "DIFFERENT from", None: "not comparable with"}[same]
    print(f"the rerun's LoRA is {said} the original's (tensor SHA-256 {after} vs {before})", file=sys.stderr)
    return same


def _train(config: Any) -> int:
    """Train `config` as `python -m lora_core train --config` does (the same events, signals and exit codes)."""
    from lora_core.cli import main as train
    from lora_core.configfile import config_to_file_dict

    handle, path = tempfile.mkstemp(prefix="rerun-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(config_to_file_dict(config), file)
        return train(["--config", path])
    finally:
        os.unlink(path)
