"""The web page through its HTTP API (gradio_client) against a launched app, on the built-in tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError

import webui
from lora_core.config import TrainConfig, load_config, non_null_schema, parse_config
from studio.jobs import Studio

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "dataset"
TERMINAL = ("complete", "error", "interrupted")
TINY = dict(base_model="builtin:tiny-sd", trigger_words="shapestyle", resolution=256, batch_size=2, lora_rank=4,
            lora_alpha=8, learning_rate=1e-3, sample_inference_steps=2, seed=7)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache):
    """One launched app for the module: (demo, studio, url, outputs folder)."""
    root = tmp_path_factory.mktemp("webui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        args = webui.parse_args(["--outputs", str(root / "outputs")])
        demo, studio, settings = webui.make_app(args)
        settings.pop("server_port")
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **settings)
        yield demo, studio, url.rstrip("/"), root
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    """One browser session for the module (closing a client waits a second for its heartbeat thread)."""
    connected = Client(served[2], verbose=False, download_files=str(served[3] / "downloads"))
    yield connected
    connected.close()


def run_state(result: tuple) -> dict | None:
    """The hidden run summary among a live-view answer (None when the page skipped an unchanged view)."""
    return next((item for item in result if isinstance(item, dict) and "job_id" in item), None)


LAST_SEEN: dict[int, dict] = {}  # per client session: the page sends a part only when it changed


def start(client: Client, **form) -> int:
    """Click Start; the id of the job it started."""
    state = run_state(client.predict(**form, api_name="/start"))
    LAST_SEEN[id(client)] = state
    return state["job_id"]


def wait_for(client: Client, done, job_id: int | None = None, timeout: float = 60.0) -> dict:
    """Poll the page's own refresh endpoint, as the browser's timer does, until `done(state)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = run_state(client.predict(api_name="/refresh")) or LAST_SEEN.get(id(client), {})
        LAST_SEEN[id(client)] = state
        if state and (job_id is None or state["job_id"] == job_id) and done(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"timed out; last state {LAST_SEEN.get(id(client))}")


def upload_demo(client: Client) -> str:
    files = [handle_file(str(path)) for path in sorted(DEMO.iterdir())]
    folder, report, gallery = client.predict(files, "shapestyle", api_name="/upload")
    assert "**6 images**, 5 with a caption file" in report
    assert len(gallery) == 6
    return folder


# ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_importing_webui_does_not_import_torch():
    code = "import sys, webui; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.e2e
def test_every_slider_and_dropdown_has_the_models_range_and_choices(served):
    demo = served[0]
    schema = {name: non_null_schema(value) for name, value in TrainConfig.model_json_schema()["properties"].items()}
    fields = {block.elem_id.removeprefix("field-"): block for block in demo.blocks.values()
              if (block.elem_id or "").startswith("field-")}
    assert set(TrainConfig.model_fields) - {"output_path"} <= set(fields)  # output_path is the run name
    sliders = dropdowns = 0
    for name, block in fields.items():
        if name not in schema:
            continue
        kind = type(block).__name__
        if kind == "Slider":
            sliders += 1
            assert (block.minimum, block.maximum) == (schema[name]["minimum"], schema[name]["maximum"]), name
            assert block.minimum % block.step == 0 if "multipleOf" in schema[name] else True
        elif kind == "Dropdown" and name != "base_model":
            dropdowns += 1
            assert [value for _, value in block.choices] == schema[name]["enum"], name
        elif kind == "Number":  # the range is stated in words, the model's own check reports violations
            low = schema[name].get("minimum", schema[name].get("exclusiveMinimum"))
            assert f"{low:g}" in block.info or str(low) in block.info, name
        if "enum" in schema[name]:
            assert kind == "Dropdown", name
    assert sliders >= 5 and dropdowns == sum("enum" in spec for spec in schema.values())


def test_validation_errors_show_at_the_field_with_the_cli_message(client):
    with pytest.raises(ValidationError) as caught:
        client.predict(dataset_path=str(DEMO), run_name="bad", trigger_words="", learning_rate=0, api_name="/start")
    cli_data = {"dataset_path": str(DEMO), "base_model": "x", "output_path": "o", "trigger_words": [],
                "learning_rate": 0}
    with pytest.raises(Exception) as cli:
        parse_config(cli_data)
    expected = dict(cli.value.problems)
    text = str(caught.value)
    assert f"- learning_rate: {expected['learning_rate']}" in text
    assert f"- trigger_words: {expected['trigger_words']}" in text
    assert "- lora_rank" not in text


@pytest.mark.e2e
def test_full_job_from_upload_to_a_lora_that_loads_in_diffusers(client, served, tmp_path):
    folder = upload_demo(client)
    assert Path(folder).parent == served[3] / "outputs" / "uploads"
    job = start(client, dataset_path=folder, run_name="full", steps=4, checkpoint_steps=2, validation_steps=4,
                **TINY)
    state = wait_for(client, lambda s: s["state"] in TERMINAL, job)
    assert state["state"] == "complete", state
    assert state["percent"] == 100 and state["step"] == 4
    reopened = Client(served[2], verbose=False, download_files=str(tmp_path / "downloads"))  # a new page
    status, plot, samples, checkpoints, final = reopened.predict(api_name="/refresh")[:5]
    reopened.close()
    assert 'data-state="complete"' in status and "step 4 / 4" in status
    assert [row[0] for row in plot["data"]] == [1, 2, 3, 4]
    assert len(samples) == 1 and samples[0]["caption"] == "step 4: shapestyle"
    assert Path(samples[0]["image"]).suffix == ".png"
    assert len(checkpoints) == 1 and Path(checkpoints[0]).name == "lora_step_2.safetensors"
    downloaded = Path(final["value"])
    assert downloaded.is_relative_to(tmp_path / "downloads") and downloaded.suffix == ".safetensors"
    assert downloaded.read_bytes() == Path(state["final_path"]).read_bytes()

    import torch
    from diffusers import StableDiffusionPipeline

    from lora_core import builtin

    pipe = StableDiffusionPipeline.from_pretrained(builtin.builtin_folder("tiny-sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    sample = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(sample, 10, context).sample
        pipe.load_lora_weights(str(downloaded.parent), weight_name=downloaded.name)
        after = pipe.unet(sample, 10, context).sample
    assert pipe.get_active_adapters()
    assert (after - before).abs().max() > 0  # the trained LoRA changes the UNet


@pytest.mark.e2e
def test_one_job_at_a_time_and_stop_keeps_a_checkpoint(served, client, tmp_path):
    long_run = dict(dataset_path=str(DEMO), run_name="long", steps=5000, checkpoint_steps=5000,
                    validation_steps=5000, **TINY)
    outcomes: list[str] = []

    def click_start() -> None:
        other = Client(served[2], verbose=False)
        try:
            other.predict(**long_run, api_name="/start")
            outcomes.append("started")
        except AppError as error:
            outcomes.append(str(error))
        finally:
            other.close()

    clicks = [threading.Thread(target=click_start) for _ in range(2)]
    for thread in clicks:
        thread.start()
    for thread in clicks:
        thread.join(60)
    assert sorted(outcomes)[1] == "started" and outcomes.count("started") == 1, outcomes
    refusal = next(item for item in outcomes if item != "started")
    assert "already running" in refusal and "Stop it, or wait" in refusal

    running = wait_for(client, lambda s: s["state"] == "running" and s["step"] >= 2)  # another browser sees it
    with pytest.raises(AppError, match="already running"):
        client.predict(**long_run, api_name="/start")
    client.predict(api_name="/stop")
    state = wait_for(client, lambda s: s["state"] in TERMINAL, running["job_id"])
    assert state["state"] == "interrupted"
    assert 2 <= state["step"] < 5000
    checkpoint = Path(state["checkpoints"][-1])
    assert checkpoint.name == f"lora_step_{state['step']}.safetensors" and checkpoint.is_file()
    reopened = Studio(served[3] / "outputs").view()  # a restarted server reads the last run back
    assert reopened.state == "interrupted" and reopened.checkpoints[-1][1] == str(checkpoint)

    target = state["step"] + 2  # Resume continues the stopped run, here with a shorter total
    result = client.predict(**{**long_run, "steps": target}, api_name="/resume")
    resumed = wait_for(client, lambda s: s["state"] in TERMINAL, run_state(result)["job_id"])
    assert resumed["state"] == "complete" and resumed["step"] == target, resumed
    assert resumed["output_path"] == state["output_path"] and Path(resumed["final_path"]).is_file()


def test_presets_fill_the_form_and_the_config_file_works_with_the_cli(client, tmp_path):
    names = webui.preset_names()
    assert {"demo-tiny-cpu", "sd15-character", "sd15-style", "sdxl-character"} <= set(names)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    keys = [param["parameter_name"] for param in api["/export_config"]["parameters"]]
    assert keys == webui.FORM_KEYS
    values = dict(zip(webui.FORM_KEYS, client.predict("sdxl-character", "", api_name="/load_preset"), strict=True))
    assert values["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert values["resolution"] == 1024 and values["gradient_checkpointing"] == "auto"
    assert values["run_name"] == "sdxl-character" and values["length_by"] == "steps"

    values.update(dataset_path=str(DEMO), length_by="epochs", epochs=3)
    exported = Path(client.predict(**values, api_name="/export_config")["value"])
    data = json.loads(exported.read_text())
    config = load_config(exported)  # what `train_lora.py --config` runs
    assert "steps" not in data["training_params"] and config.epochs == 3
    assert config.base_model == values["base_model"] and config.lora_rank == 32
    assert Path(config.output_path).name == "sdxl-character"


@pytest.mark.e2e
def test_file_routes_serve_only_the_outputs(served, tmp_path):
    _, studio, url, _ = served
    inside = studio.outputs_root / "probe.txt"
    inside.write_text("mine")
    with httpx.Client(base_url=url) as http:
        assert http.get(f"/gradio_api/file={inside}").text == "mine"  # the job's outputs are served
        for path in ("/etc/passwd", str(ROOT / "webui.py"), str(ROOT / "presets" / "demo-tiny-cpu.json"),
                     f"{studio.outputs_root}/../../../../etc/passwd", f"{studio.outputs_root}/%2e%2e/x"):
            assert http.get(f"/gradio_api/file={path}").status_code in (403, 404), path
        monitoring = http.get("/monitoring")
        assert monitoring.status_code == 403 and "not enabled" in monitoring.text


@pytest.mark.e2e
def test_login_required_when_auth_is_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_AUTH", "ada:lovelace")
    args = webui.parse_args(["--outputs", str(tmp_path / "outputs")])
    demo, _, settings = webui.make_app(args)
    settings.pop("server_port")
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **settings)
    try:
        with httpx.Client(base_url=url) as http:
            assert http.get("/config").status_code == 401
            assert http.post("/gradio_api/queue/join", json={}).status_code in (401, 403)
            assert http.post("/login", data={"username": "ada", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "ada", "password": "lovelace"}).status_code == 200
            assert http.get("/config").status_code == 200
    finally:
        demo.close()


def test_safe_launch_defaults_and_a_warning_when_exposed(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("LORA_STUDIO_AUTH", raising=False)
    args = webui.parse_args(["--outputs", str(tmp_path / "out")])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert webui.exposure_warning(args) is None
    launched: dict = {}
    webui.main(["--outputs", str(tmp_path / "out"), "--host", "0.0.0.0"], launch=launched.update)
    assert "without a login" in caplog.text
    assert launched["enable_monitoring"] is False and launched["share"] is False
    assert launched["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert launched["max_file_size"] == "200mb" and launched["server_name"] == "0.0.0.0"
    assert webui.exposure_warning(webui.parse_args(["--host", "0.0.0.0", "--auth", "a:b"])) is None


@pytest.mark.e2e
def test_a_failed_run_is_shown_plainly_with_its_field(client, tmp_path):
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    job = start(client, dataset_path=str(empty), run_name="fails", steps=2, **TINY)
    state = wait_for(client, lambda s: s["state"] in TERMINAL, job)
    assert state["state"] == "error" and state["error_field"] == "dataset_path"
    assert "no usable image" in state["message"]
    result = client.predict(api_name="/refresh")
    assert run_state(result) is None  # unchanged since the last poll: nothing is sent again


def test_estimate_shows_device_memory_and_a_warning_when_it_will_not_fit(client):
    fits = client.predict(dataset_path=str(DEMO), run_name="estimate", steps=4, **TINY, api_name="/estimate")
    assert "**Device:** CPU" in fits and "**Memory estimate:** about" in fits and "Ready to train" in fits
    huge = {**TINY, "base_model": "builtin:sd15-arch", "resolution": 2048, "batch_size": 64}
    too_big = client.predict(dataset_path=str(DEMO), run_name="estimate", steps=4, **huge, api_name="/estimate")
    assert "Will not fit" in too_big and "GiB is free" in too_big


def test_save_preset_writes_a_config_file_and_never_overwrites_a_shipped_one(client, tmp_path, monkeypatch):
    monkeypatch.setattr(webui, "PRESETS", tmp_path)
    form = dict(dataset_path=str(DEMO), run_name="mine", steps=7, **TINY)
    update = client.predict("my run!", **form, api_name="/save_preset")
    saved = load_config(tmp_path / "my-run.json")
    assert update["value"] == "my-run" and saved.steps == 7 and saved.base_model == "builtin:tiny-sd"
    with pytest.raises(AppError, match="ships with the studio"):
        client.predict("sd15-character", **form, api_name="/save_preset")
    assert not (tmp_path / "sd15-character.json").exists()


@pytest.mark.e2e
def test_sigterm_to_the_server_lets_the_running_job_save_a_checkpoint(tmp_path):
    """`docker stop` sends SIGTERM: the job stops after its step with a checkpoint before the server exits."""
    import os
    import signal

    from conftest import DEMO_DATASET, ROOT, tiny_config

    outputs = tmp_path / "outputs"
    config = tiny_config(DEMO_DATASET, outputs / "run", steps=5000, checkpoint_steps=10_000, validation_steps=10_000)
    script = (
        "import json, sys, time\n"
        "import webui\n"
        "from lora_core.config import parse_config\n"
        "from studio.jobs import Studio\n"
        f"studio = Studio({str(outputs)!r})\n"
        f"studio.start(parse_config(json.loads({json.dumps(json.dumps(config))})))\n"
        "webui.install_signal_handlers(studio)\n"
        "while True:\n"
        "    time.sleep(0.2)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events_file = outputs / "run" / "events.jsonl"
    deadline = time.monotonic() + 120
    while not (events_file.exists() and '"progress"' in events_file.read_text(encoding="utf-8")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the job never made progress"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    events = [json.loads(line) for line in events_file.read_text(encoding="utf-8").splitlines()]
    assert events[-1]["type"] == "interrupted"
    assert Path(events[-1]["checkpoint_path"]).is_file()


@pytest.mark.e2e
def test_the_studio_trains_on_several_devices_through_the_launcher(tmp_path):
    """`--gpus 2`: the job runs as two data-parallel processes in a child (here two CPU processes, gloo)."""
    from conftest import DEMO_DATASET, tiny_config

    from webui import estimate_markdown

    studio = Studio(tmp_path / "outputs", processes=2)
    assert studio.num_processes() == 2 and Studio(tmp_path / "o2", processes="all").num_processes() >= 1
    config = parse_config(tiny_config(DEMO_DATASET, tmp_path / "outputs" / "run", steps=2, batch_size=1,
                                      validation_steps=100, device="cpu"))
    studio.start(config)
    deadline = time.monotonic() + 180
    while studio.view().state not in ("complete", "error", "interrupted"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    view = studio.view()
    assert view.state == "complete", view.message
    started = json.loads((tmp_path / "outputs" / "run" / "events.jsonl").read_text().splitlines()[0])
    assert started["type"] == "started" and started["num_processes"] == 2

    from lora_core.preflight import preflight

    markdown = estimate_markdown(preflight(config, num_processes=studio.num_processes()))
    assert "**Devices:** 2 training process(es)" in markdown and "global batch 2" in markdown
