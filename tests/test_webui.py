"""The web page through its HTTP API (gradio_client) against a launched app, on the built-in tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from helpers import POLL_S, launch_page, run_summary, wait_for_job

import webui
from lora_core.config import TrainConfig, non_null_schema
from lora_core.configfile import load_config, parse_config
from studio import render, train_form
from studio.jobs import Studio
from studio.jobview import RunView
from studio.runs import read_detail

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "data" / "shapes"
TERMINAL = ("complete", "failed", "stopped")
TINY = dict(base_model="builtin:tiny-sd", trigger_words="shapestyle", resolution=256, batch_size=2, lora_rank=4,
            lora_alpha=8, learning_rate=1e-3, sample_inference_steps=2, seed=7)


def launch_app(outputs: Path) -> tuple:
    """A page server in this process on a free port: (demo, studio, url)."""
    return launch_page("--outputs", str(outputs))


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_cache):
    """One launched app for the module: (demo, studio, url, outputs folder)."""
    root = tmp_path_factory.mktemp("webui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        demo, studio, url = launch_app(root / "outputs")
        yield demo, studio, url, root
        studio.shutdown(timeout=30)
        demo.close()


@pytest.fixture(scope="module")
def client(served):
    """One browser session for the module (closing a client waits a second for its heartbeat thread)."""
    connected = Client(served[2], verbose=False, download_files=str(served[3] / "downloads"))
    yield connected
    connected.close()


LAST_SEEN: dict[int, dict] = {}  # per client session: the page sends a part only when it changed


def start(client: Client, **form) -> str:
    """Click Start; the id of the job it started or queued."""
    return submit(client, **form)["job_id"]


def submit(client: Client, **form) -> dict:
    """Click Start: {job_id, state (running | queued), position, output_path}."""
    answer = client.predict(**form, api_name="/start")
    assert answer["state"] in ("running", "queued"), answer
    return answer


def wait_for(client: Client, done, job_id: str | None = None, timeout: float = 60.0) -> dict:
    """Poll until `done(state)`: one job's `run` endpoint, or without a job id the page's own refresh
    endpoint, as the browser's timer does (it shows the current job)."""
    if job_id is not None:
        return wait_for_job(client, job_id, done, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = run_summary(client.predict(api_name="/refresh")) or LAST_SEEN.get(id(client), {})
        LAST_SEEN[id(client)] = state
        if state and done(state):
            return state
        time.sleep(POLL_S)
    raise AssertionError(f"timed out; last state {LAST_SEEN.get(id(client))}")


def upload_demo(client: Client) -> str:
    files = [handle_file(str(path)) for path in sorted(DEMO.iterdir())]
    folder, report, gallery, words, _ = client.predict(files, "shapestyle", "", "", api_name="/upload")
    assert words == "shapestyle"  # typed for this upload (the form had no dataset before): kept
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


SERVER_WITHOUT_TORCH = """
import sys, webui
from studio.train_form import default_form
demo, studio, _ = webui.make_app(webui.parse_args(["--outputs", sys.argv[1]]))
endpoint = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
form = {**default_form(), "dataset_path": sys.argv[2], "base_model": "builtin:tiny-sd", "trigger_words": "shapestyle",
        "steps": 1, "resolution": 64, "bucketing": False, "checkpoint_steps": 1, "validation_steps": 1000,
        "sample_inference_steps": 1}
print(endpoint["estimate"](**form).replace(chr(10), " "))
print(endpoint["model_family"]("builtin:tiny-sd")[next(iter(endpoint["model_family"]("builtin:tiny-sd")))])
endpoint["scan"](sys.argv[2], "shapestyle")
trained = studio.wait(endpoint["start"](**form)["job_id"], timeout=240)
drawn = studio.wait(endpoint["grid"](trained.output_path.rsplit("/", 1)[-1], None, "a circle")["job_id"], timeout=240)
checked = studio.wait(endpoint["doctor"](sys.argv[2], "shapestyle")[2], timeout=120)
print(trained.state, drawn.state, checked.state)
print(studio.device_count(), "torch" in sys.modules, any("libcuda" in line for line in open("/proc/self/maps")),
      any(name in sys.modules for name in ("lora_core.doctor", "lora_core.doctor_images", "lora_core.imagehash")))
studio.shutdown()
"""


@pytest.mark.e2e
def test_the_server_builds_the_page_counts_devices_estimates_trains_and_draws_without_loading_torch(tmp_path):
    """The estimate is `train --validate-only` in a child process, and so is the GPU count, the model's family,
    training, a grid and the dataset doctor: after all of them the page's server has loaded neither torch nor the
    CUDA driver (a CUDA context there would hold memory every job lacks) nor the doctor's image checks. In a
    subprocess: other tests import torch here."""
    from helpers import SHAPES_DATASET

    result = subprocess.run([sys.executable, "-c", SERVER_WITHOUT_TORCH, str(tmp_path / "out"), str(SHAPES_DATASET)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    estimate, family, states, checks = result.stdout.strip().splitlines()[-4:]
    assert "**Device:**" in estimate and "**Memory estimate:**" in estimate, estimate
    assert family.startswith("Detected: **SD 1.x") and states == "complete complete complete", (family, states)
    count, torch_loaded, cuda_mapped, doctor_loaded = checks.split()
    assert int(count) >= 0 and (torch_loaded, cuda_mapped, doctor_loaded) == ("False", "False", "False")


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


def test_validation_errors_show_at_the_field_in_plain_words(client):
    """pydantic's messages ("String should have at least 1 character") are rewritten per error type into words
    that name the field's label and say what to do."""
    with pytest.raises(ValidationError) as caught:
        client.predict(dataset_path="", run_name="bad", trigger_words="", learning_rate=5, steps=-5, resolution=65,
                       api_name="/start")
    text = str(caught.value)
    assert "- dataset_path: Dataset folder is empty: upload images" in text
    assert "- trigger_words: Trigger words are empty" in text
    assert "- learning_rate: Learning rate must be at most 1 (you gave 5)." in text
    assert "- steps: Steps must be at least 1 (you gave -5)." in text
    assert "- resolution: Resolution must be a multiple of 8 (you gave 65); the nearest is 64." in text
    assert "should" not in text and "- lora_rank" not in text


@pytest.mark.e2e
def test_full_job_from_upload_to_a_lora_that_loads_in_diffusers(client, served, tmp_path):
    folder = upload_demo(client)
    assert Path(folder).parent == served[3] / "outputs" / "uploads"
    job = start(client, dataset_path=folder, run_name="full", steps=4, checkpoint_steps=2, validation_steps=4,
                **TINY)
    state = wait_for(client, lambda s: s["state"] in TERMINAL, job)
    assert state["state"] == "complete", state
    assert state["percent"] == 100 and state["step"] == 4
    run = Path(state["output_path"])  # the job was a process of its own, recorded in the server's own folder
    record = json.loads((run.parent / ".studio" / "jobs" / job / "job.json").read_text())
    assert record["job_id"] == job and record["pid"] != os.getpid() and gone(record["pid"])
    assert record["command"][1:4] == ["-m", "lora_core", "train"] and record["target"] == str(run)
    assert (run.parent / ".studio" / "jobs" / job / "stderr.log").is_file()
    assert not {"job.json", "job_config.json", "stderr.log"} & {path.name for path in run.iterdir()}  # the run's only
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
def test_starts_queue_in_order_stop_is_answered_under_a_flood_of_polls_and_keeps_a_checkpoint(served, client):
    """The queue, one job at a time on the one device: two clicks at once (one runs, one queues, Cancel takes
    it out), Stop is answered while 24 pages poll as fast as they can, Resume continues the stopped run through
    the queue, starts behind it queue up and Move up reorders them, and they run by themselves in that order."""
    long_run = dict(dataset_path=str(DEMO), run_name="long", steps=5000, checkpoint_steps=5000,
                    validation_steps=5000, **TINY)
    answers: list[dict] = []

    def click_start() -> None:
        other = Client(served[2], verbose=False)
        try:
            answers.append(other.predict(**long_run, api_name="/start"))
        finally:
            other.close()

    clicks = [threading.Thread(target=click_start) for _ in range(2)]  # two browsers at once: both are taken
    for thread in clicks:
        thread.start()
    for thread in clicks:
        thread.join(60)
    assert sorted(answer["state"] for answer in answers) == ["queued", "running"], answers
    queued = next(answer for answer in answers if answer["state"] == "queued")
    first = next(answer for answer in answers if answer["state"] == "running")
    assert queued["position"] == 1 and queued["output_path"] != first["output_path"]  # its own folder, said
    assert [job["job_id"] for job in client.predict(api_name="/queue")] == [queued["job_id"]]
    assert client.predict(queued["job_id"], api_name="/cancel")["cancelled"] is True
    assert client.predict(api_name="/queue") == [] and not Path(queued["output_path"]).exists()

    running = wait_for(client, lambda s: s["state"] == "running" and s["step"] >= 2, first["job_id"], timeout=120)
    polling, failures, polls = threading.Event(), [], []

    def poll() -> None:  # a page's timer, as fast as it can go, for a bounded time
        page = Client(served[2], verbose=False)
        deadline = time.monotonic() + 90
        try:
            while polling.is_set() and time.monotonic() < deadline:
                try:
                    page.predict(api_name="/refresh")
                    polls.append(1)
                except Exception as error:  # a refused poll is fine; a refused Stop is not
                    failures.append(str(error))
        finally:
            page.close()

    polling.set()
    pollers = [threading.Thread(target=poll) for _ in range(24)]
    for thread in pollers:
        thread.start()
    try:
        while len(polls) < 48:  # the flood is on
            time.sleep(0.05)
        assert client.predict(api_name="/stop") == {"stopped": True, "job_id": running["job_id"]}
    finally:  # Stop was answered during the flood: that was the point, the rest needs no flood
        polling.clear()
        for thread in pollers:
            thread.join(60)
    state = wait_for(client, lambda s: s["state"] in TERMINAL, running["job_id"])
    assert not any("Queue is full" in failure for failure in failures), failures[:3]
    assert state["state"] == "stopped" and 2 <= state["step"] < 5000
    checkpoint = Path(state["checkpoints"][-1])
    assert checkpoint.name == f"lora_step_{state['step']}.safetensors" and checkpoint.is_file()
    reopened = read_detail(Path(state["output_path"]))  # what a restarted server reads back
    assert reopened.state == "stopped" and reopened.checkpoints[-1]["path"] == str(checkpoint)

    target = state["step"] + 2  # Resume continues the stopped run (through the queue), here with a shorter total
    resumed_job = client.predict(**{**long_run, "steps": target}, api_name="/resume")
    assert resumed_job["state"] == "running" and resumed_job["output_path"] == state["output_path"]
    quick = dict(dataset_path=str(DEMO), steps=2, checkpoint_steps=100, validation_steps=100, **TINY)
    later = [submit(client, run_name=f"in-order-{index}", **quick) for index in range(2)]  # behind the resume
    assert [(a["state"], a["position"]) for a in later] == [("queued", 1), ("queued", 2)]
    ids = [answer["job_id"] for answer in later]
    assert client.predict(ids[1], api_name="/move_up") == {"job_id": ids[1], "position": 1}
    assert [job["job_id"] for job in client.predict(api_name="/queue")] == [ids[1], ids[0]]
    resumed = wait_for(client, lambda s: s["state"] in TERMINAL, resumed_job["job_id"], timeout=120)
    assert resumed["state"] == "complete" and resumed["step"] == target, resumed
    assert Path(resumed["final_path"]).is_file()
    assert resumed["checkpoints"][0] == str(checkpoint)  # the checkpoints before the resume stay listed
    for job_id in (ids[1], ids[0]):  # each starts by itself when the one before it ends
        assert wait_for(client, lambda s: s["state"] in TERMINAL, job_id, timeout=180)["state"] == "complete"
    starts = [job_record(answer)["start_time"] for answer in later]
    assert starts[1] < starts[0]
    assert client.predict(api_name="/queue") == []


def test_presets_fill_the_form_and_the_config_file_works_with_the_cli(client, tmp_path):
    names = train_form.preset_names()
    assert {"demo-toy-cpu", "sd15-character", "sd15-style", "sdxl-character"} <= set(names)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    keys = [param["parameter_name"] for param in api["/export_config"]["parameters"]]
    assert keys == train_form.FORM_KEYS
    values = dict(zip(train_form.FORM_KEYS, client.predict("sdxl-character", "", api_name="/load_preset"), strict=True))
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
        for path in ("/etc/passwd", str(ROOT / "webui.py"), str(ROOT / "presets" / "demo-toy-cpu.json"),
                     f"{studio.outputs_root}/../../../../etc/passwd", f"{studio.outputs_root}/%2e%2e/x"):
            assert http.get(f"/gradio_api/file={path}").status_code in (403, 404), path
        monitoring = http.get("/monitoring")
        assert monitoring.status_code == 403 and "not enabled" in monitoring.text


@pytest.mark.e2e
def test_login_required_when_auth_is_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_AUTH", "ada:lovelace")
    demo, _, url = launch_page("--outputs", str(tmp_path / "outputs"))
    try:
        with httpx.Client(base_url=url) as http:
            assert http.get("/config").status_code == 401
            assert http.post("/gradio_api/queue/join", json={}).status_code in (401, 403)
            assert http.post("/login", data={"username": "ada", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "ada", "password": "lovelace"}).status_code == 200
            assert http.get("/config").status_code == 200
            guesses = [http.post("/login", data={"username": "ada", "password": f"guess{i}"}) for i in range(5)]
            assert [r.status_code for r in guesses] == [400, 400, 400, 400, 429]  # then a wait per client
            assert int(guesses[-1].headers["retry-after"]) >= 1
    finally:
        demo.close()


def test_safe_launch_defaults_and_a_warning_when_exposed(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("LORA_STUDIO_AUTH", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)  # each xdist worker sets its own port range
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


@pytest.mark.e2e  # a server, a trained run or a whole model written: not the quick subset
def test_estimate_shows_device_memory_and_a_warning_when_it_will_not_fit(client):
    fits = client.predict(dataset_path=str(DEMO), run_name="estimate", steps=4, **TINY, api_name="/estimate")
    assert "**Device:** CPU" in fits and "**Memory estimate:** about" in fits and "Ready to train" in fits
    huge = {**TINY, "base_model": "builtin:sd15-arch", "resolution": 2048, "batch_size": 64}
    too_big = client.predict(dataset_path=str(DEMO), run_name="estimate", steps=4, **huge, api_name="/estimate")
    assert "Will not fit" in too_big and "GiB is free" in too_big


def test_save_preset_writes_a_config_file_and_never_overwrites_a_shipped_one(client, served, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"  # the install's own presets, which may be read-only: never written
    shutil.copytree(train_form.PRESETS, shipped)
    monkeypatch.setattr(train_form, "PRESETS", shipped)
    form = dict(dataset_path=str(DEMO), run_name="mine", steps=7, **TINY)
    update = client.predict("my run!", **form, api_name="/save_preset")
    saved = load_config(served[1].outputs_root / train_form.USER_PRESETS / "my-run.json")
    assert update["value"] == "my-run" and saved.steps == 7 and saved.base_model == "builtin:tiny-sd"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in (train_form.ROOT / "presets").iterdir())
    with pytest.raises(AppError, match="ships with the studio"):
        client.predict("sd15-character", **form, api_name="/save_preset")
    loaded = client.predict("my-run", "", api_name="/load_preset")
    assert loaded[train_form.FORM_KEYS.index("steps")] == 7


@pytest.mark.e2e
def test_the_studio_trains_on_several_devices_through_the_launcher_and_stop_ends_them_together(tmp_path):
    """`--gpus 2`: the job runs as two data-parallel processes under `accelerate launch` in a child (here two CPU
    processes, gloo); Stop (SIGTERM to the launcher, which passes it on) ends both after the same step, with one
    final event and a checkpoint."""
    from helpers import SHAPES_DATASET, tiny_config

    from lora_core.eventlog import read_events
    from studio.launcher import validation_report
    from studio.render import estimate_markdown

    studio = Studio(tmp_path / "outputs", processes=2)
    assert studio.num_processes() == 2 and Studio(tmp_path / "o2", processes="all").num_processes() >= 1
    run = tmp_path / "outputs" / "run"
    config = parse_config(tiny_config(SHAPES_DATASET, run, steps=500, batch_size=1, checkpoint_steps=1000,
                                      validation_steps=1000, device="cpu"))
    estimate = validation_report(config, studio.num_processes(), starter=studio.starter)  # the page's estimate
    assert estimate["devices"]["global_batch_size"] == 2
    markdown = estimate_markdown(estimate)
    assert "**Devices:** 2 training process(es)" in markdown and "global batch 2" in markdown
    job = studio.submit(config).job_id
    deadline = time.monotonic() + 180
    while studio.view(job).step < 2 and studio.view(job).state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    assert studio.stop(job)
    view = studio.wait(job, timeout=90)
    studio.shutdown()
    events = read_events(run / "events.jsonl")
    assert view.state == "stopped" and events[-1].type == "interrupted", view.message
    assert events[0].type == "started" and events[0].num_processes == 2
    assert [e.type for e in events].count("started") == 1 and [e.terminal for e in events].count(True) == 1
    assert 2 <= events[-1].step < 10 and Path(events[-1].checkpoint_path).is_file()  # promptly, after the step
    assert json.loads((run / "config.json").read_text())["training_params"]["batch_size"] == 1
    assert not (run / "logs").exists()  # TensorBoard is off by default


LONG = dict(dataset_path=str(DEMO), steps=5000, checkpoint_steps=5000, validation_steps=5000, **TINY)


def job_record(state: dict) -> dict:
    """A page job's job.json: in the server's own folder, OUTPUTS/.studio/jobs/<job id> (studio/jobfiles.py)."""
    return json.loads((Path(state["output_path"]).parent / ".studio" / "jobs" / state["job_id"] / "job.json")
                      .read_text())


@pytest.mark.e2e
def test_a_job_killed_with_sigkill_shows_as_failed_with_its_signal_and_stderr(client, served):
    job = start(client, run_name="killed", **LONG)
    running = wait_for(client, lambda s: s["state"] == "running", job, timeout=120)
    pid = job_record(running)["pid"]
    assert psutil.Process(pid).ppid() == served[1].starter._process.pid  # forked from the page's job starter
    os.kill(pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    state = wait_for(client, lambda s: s["state"] in TERMINAL, job)
    assert state["state"] == "failed" and "killed by signal 9 (SIGKILL)" in state["message"]
    assert "Last lines of stderr.log" in state["message"] and state["stderr_tail"]
    assert state["stderr_tail"][0].startswith("--- ")  # the job's own stderr, from its job folder
    page = Client(client.src, verbose=False)  # a page opened now shows the failure, with the signal
    status = page.predict(api_name="/refresh")[0]
    page.close()
    assert 'data-state="failed"' in status and "signal 9" in status


@pytest.mark.e2e
def test_a_restarted_server_shows_a_running_job_again_then_complete_and_keeps_the_queue(tmp_path):
    outputs = tmp_path / "outputs"
    demo, studio, url = launch_app(outputs)
    first = Client(url, verbose=False)
    # long enough to outlive the restart on an idle machine too (building the page takes seconds)
    job = start(first, **{**LONG, "steps": 150}, run_name="outlives")
    waiting = submit(first, **{**LONG, "steps": 1}, run_name="waits")
    assert waiting["state"] == "queued"
    before = wait_for(first, lambda s: s["state"] == "running", job, timeout=120)
    first.close()
    studio.shutdown(stop_jobs=False)  # what --detach-jobs does on SIGTERM
    demo.close()
    pid = job_record(before)["pid"]
    assert psutil.pid_exists(pid), "the job outlives its server"

    demo, studio, url = launch_app(outputs)
    second = Client(url, verbose=False)
    try:
        again = wait_for(second, lambda s: s["job_id"] == job, timeout=30)
        assert again["state"] == "running" and again["step"] >= before["step"], again  # followed live again
        assert [queued["job_id"] for queued in second.predict(api_name="/queue")] == [waiting["job_id"]]
        done = wait_for(second, lambda s: s["state"] in TERMINAL, job, timeout=180)
        assert done["state"] == "complete" and done["step"] == 150 and Path(done["final_path"]).is_file()
        after = wait_for(second, lambda s: s["state"] in TERMINAL, waiting["job_id"], timeout=180)
        assert after["state"] == "complete"  # the queue survived the restart and went on by itself
    finally:
        second.close()
        studio.shutdown()
        demo.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(outputs: Path, port: int) -> subprocess.Popen:
    """`python webui.py` as a process of its own, answering on `port`."""
    process = subprocess.Popen([sys.executable, str(ROOT / "webui.py"), "--outputs", str(outputs), "--port",
                                str(port)], cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}"
        assert time.monotonic() < deadline, "the server never answered"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


@pytest.mark.e2e
def test_after_kill_9_of_the_server_a_fresh_one_shows_the_job_and_sigterm_stops_it_with_a_checkpoint(tmp_path):
    outputs = tmp_path / "outputs"
    port = free_port()
    old = serve(outputs, port)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        job = start(client, run_name="orphan", **LONG)
        before = wait_for(client, lambda s: s["state"] == "running", job, timeout=120)
        client.close()
    finally:
        old.kill()  # kill -9: no handler runs, the job is not told
        old.wait(30)
    pid = job_record(before)["pid"]
    assert psutil.pid_exists(pid), "the job outlives its server"

    new = serve(outputs, port)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        again = wait_for(client, lambda s: s["job_id"] == job and s["step"] > before["step"], timeout=60)
        assert again["state"] == "running"
        client.close()
        new.send_signal(signal.SIGTERM)  # docker stop: the running job saves a checkpoint, then the server exits
        assert new.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        new.kill()
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    events = [json.loads(line) for line in (Path(before["output_path"]) / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "interrupted" and Path(events[-1]["checkpoint_path"]).is_file()
    assert gone(pid)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process `pid` runs (an orphan's zombie waits for init to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_the_runs_tab_of_the_full_app_lists_a_run_made_outside_the_server(client, served):
    folder = served[3] / "outputs" / "made-by-the-cli"
    folder.mkdir(parents=True)
    started = {"type": "started", "timestamp": "2026-12-01T09:00:00.000+00:00", "total_steps": 4, "num_images": 2,
               "device": "cpu", "mixed_precision": "no", "model_family": "sd15", "output_path": str(folder)}
    done = {"type": "complete", "timestamp": "2026-12-01T09:00:05.000+00:00", "final_path": "x", "total_time": 5.0,
            "step": 4}
    (folder / "events.jsonl").write_text(json.dumps(started) + "\n" + json.dumps(done) + "\n")
    rows = {row["id"]: row for row in client.predict(api_name="/runs")[1]}
    assert rows["made-by-the-cli"]["state"] == "complete" and rows["made-by-the-cli"]["duration_s"] == 5.0


def test_the_loss_plots_axes_are_numbers_even_before_the_first_point():
    """An untyped empty frame made gr.LinePlot draw category axes (a tick per step) for the rest of the run."""
    import gradio as gr

    from studio.runs_page import _frame

    plot = gr.LinePlot(x="step", y="loss", color="line")
    frames = {"empty live view": render.loss_frame(RunView(job_id="j", state="starting", output_path="/o")),
              "live view": render.loss_frame(RunView(job_id="j", state="running", output_path="/o",
                                                    loss_points=[(1, 0.5)], validation_points=[(0, 0.7)])),
              "empty Runs view": _frame({}), "Runs view": _frame({"a": [(1, 0.5), (2, 0.4)]}, validation=[(0, 0.6)])}
    for name, frame in frames.items():
        datatypes = plot.postprocess(frame).datatypes
        assert (datatypes["step"], datatypes["loss"], datatypes["line"]) == ("quantitative", "quantitative",
                                                                             "nominal"), name
