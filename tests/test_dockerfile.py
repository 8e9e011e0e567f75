"""The container, checked without a Docker engine: the Dockerfile parsed, its entrypoint and health check run.

What needs an engine (the build, --gpus, the CUDA base image's tag) is not checked here.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ROOT, tiny_config

sys.path.insert(0, str(ROOT / "docker"))
import entrypoint  # noqa: E402
import healthcheck  # noqa: E402

APP_DIR = "/app"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def one(name: str) -> str:
    found = [args for word, args in instructions() if word == name]
    assert found, f"the Dockerfile has no {name}"
    return found[-1]  # the last one is the one that counts


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # shell form ("CMD python x") is not JSON and fails here
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path (or a folder above it) decides; `!` re-includes."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
               for prefix in prefixes):
            ignored = not negated
    return ignored


def test_the_image_keeps_the_toy_models_weights_and_the_demo_but_not_other_weights():
    weights = [p.relative_to(ROOT).as_posix() for p in (ROOT / "lora_core" / "toy" / "weights").rglob("*")
               if p.is_file()]
    assert any(name.endswith(".safetensors") for name in weights)
    assert not [name for name in weights if dockerignored(name)]
    assert not dockerignored("demo/dataset/zwx_01.png") and not dockerignored("presets/demo-toy-cpu.json")
    assert dockerignored("outputs/demo/lora_final.safetensors") and dockerignored("model.safetensors")


def in_repo(container_path: str) -> Path:
    """The repository file that `COPY . /app` puts at `container_path`."""
    assert container_path.startswith(APP_DIR + "/"), container_path
    relative = container_path.removeprefix(APP_DIR + "/")
    assert not dockerignored(relative), f"{relative} is excluded by .dockerignore"
    return ROOT / relative


def test_a_cuda_runtime_base_image_and_requirements_installed():
    args = dict(arg.split("=", 1) for word, arg in instructions() if word == "ARG" and "=" in arg)
    base = one("FROM")
    for name, value in args.items():
        base = base.replace("${" + name + "}", value)
    image, _, tag = base.partition(":")
    assert (image == "nvidia/cuda" and "runtime" in tag) or (image == "pytorch/pytorch" and "runtime" in tag), base
    copies = [shlex.split(args) for word, args in instructions() if word == "COPY"]
    sources = [item for parts in copies for item in parts[:-1] if not item.startswith("--")]
    assert "requirements.txt" in sources and "." in sources
    assert all((ROOT / source).exists() for source in sources)
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert "pip install -r /app/requirements.txt" in runs
    assert one("WORKDIR") == APP_DIR


def test_it_runs_as_a_non_root_user_with_volumes_for_data_and_outputs():
    user = one("USER")
    assert user.split(":")[0] not in ("root", "0")
    order = [word for word, _ in instructions()]
    assert order.index("USER") < order.index("ENTRYPOINT")
    volumes = set(exec_form(one("VOLUME")))
    assert {"/datasets", "/outputs"} <= volumes
    env = " ".join(args for word, args in instructions() if word == "ENV")
    assert "LORA_STUDIO_OUTPUTS=/outputs" in env and "LORA_STUDIO_DATASETS=/datasets" in env
    assert "7860" in one("EXPOSE").split()


def test_exec_form_entrypoint_and_a_cmd_that_serves_the_page_on_all_interfaces():
    entry = exec_form(one("ENTRYPOINT"))
    assert entry[0] == "tini" and "--" in entry  # PID 1 forwards SIGTERM and reaps children
    python_at = entry.index("python")
    script = in_repo(entry[python_at + 1])
    assert script == ROOT / "docker" / "entrypoint.py" and script.is_file()

    cmd = exec_form(one("CMD"))
    mode, command = entrypoint.build_command(cmd, python="python")
    assert mode == "web"
    assert command[1] == str(entrypoint.WEB_SCRIPT) and entrypoint.WEB_SCRIPT == ROOT / "webui.py"
    assert entrypoint.WEB_SCRIPT.is_file()
    webui = pytest.importorskip("webui")
    args = webui.parse_args(command[2:])  # webui.py itself accepts what the image passes
    assert (args.host, args.port) == ("0.0.0.0", 7860)


def test_the_same_entrypoint_trains_from_a_config():
    mode, command = entrypoint.build_command(["--config", "/config/config.json"], python="python")
    assert mode == "train" and command == ["python", str(ROOT / "train_lora.py"), "--config", "/config/config.json"]
    mode, command = entrypoint.build_command(["train", "--num-processes", "4", "--config", "c.json", "--resume"],
                                             python="python")
    assert mode == "train" and command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-6:] == ["-m", "lora_core", "train", "--config", "c.json", "--resume"]  # the engine's entry
    assert entrypoint.build_command(["accelerate", "launch", "x.py"])[1] == ["accelerate", "launch", "x.py"]
    assert entrypoint.build_command(["web", "--demo"], python="p")[1] == [
        "p", str(ROOT / "webui.py"), "--host", "0.0.0.0", "--port", "7860", "--demo"]


@pytest.mark.e2e
def test_the_entrypoint_execs_the_cli_so_signals_reach_python(dataset_dir, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(dataset_dir, tmp_path / "out")))
    env = {**os.environ, "LORA_STUDIO_MODE_FILE": str(tmp_path / "mode")}
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "entrypoint.py"), "--config", str(config),
                           "--validate-only"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # train_lora.py's --validate-only report, a typed event
    assert report["type"] == "validation_report" and report["ok"] is True
    assert (tmp_path / "mode").read_text().split() == ["train"]

    # exec, not a child: the command's PID is the entrypoint's, so docker stop's SIGTERM reaches it
    probe = subprocess.Popen([sys.executable, str(ROOT / "docker" / "entrypoint.py"), sys.executable, "-c",
                              "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True, env=env)
    assert int(probe.communicate(timeout=30)[0]) == probe.pid


@pytest.mark.e2e
def test_the_health_check_asks_the_page_and_passes_a_training_run(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    mode_file = tmp_path / "mode"
    monkeypatch.setattr(healthcheck, "MODE_FILE", mode_file)
    try:
        mode_file.write_text(f"web {server.server_address[1]}\n")
        assert healthcheck.main() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main() == 1  # nothing answers on that port any more
    mode_file.write_text("train\n")
    assert healthcheck.main() == 0
    health = exec_form(one("HEALTHCHECK").split("CMD", 1)[1].strip())
    assert in_repo(health[1]) == ROOT / "docker" / "healthcheck.py"
