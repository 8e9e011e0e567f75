"""Issue 13's rough edges on the page: an upload clears the previous dataset's words, Start refuses an unusable
dataset before queueing, a job that failed before training stays in the Runs list as failed, the run folder is
said before Start, a new dataset moves the Train panel on from an old failure, Stop offers the LoRA saved so
far, Resume keeps the history; the Advanced section is grouped and no label needs an emoji font."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError
from helpers import SHAPES_DATASET, launch_page, make_dataset, run_summary, wait_for_job

from studio import render, train_form
from studio.formspec import ADVANCED_TABS, advanced_tabs, field_specs
from studio.jobview import RunView

TINY = dict(base_model="builtin:tiny-sd", trigger_words="shapestyle", resolution=256, batch_size=2, lora_rank=4,
            lora_alpha=8, learning_rate=1e-3, sample_inference_steps=2, seed=7, checkpoint_steps=1000,
            validation_steps=1000)
TERMINAL = ("complete", "failed", "stopped")
EMOJI = re.compile("[\u2600-\u27bf\U0001f000-\U0001ffff\ufe0f]")


# ----------------------------------------------------------------------------------------------------
# without a server


def test_an_upload_clears_the_words_of_a_previous_dataset_only():
    cleared = train_form.words_to_clear("/data/demo", "shapestyle, sks", "a red square\na blue circle")
    assert cleared == "the trigger words `shapestyle, sks` and 2 sample prompts"
    assert train_form.words_to_clear("", "mine", "typed for this upload") == ""  # no dataset before: kept
    assert train_form.words_to_clear("/data/demo", "", "") == ""


def test_the_page_has_words_for_every_run_state_and_nothing_else():
    from lora_core.runrecord import STATES

    assert set(render.STATE_WORDS) == {*STATES, "idle"}  # idle: no run at all, not a run's state
    assert set(render.ENDED_WORDS) == {"complete", "stopped", "failed"}


def test_the_built_in_models_the_page_offers_are_the_engines_toy_and_tiny_ones():
    from lora_core import builtin

    assert list(train_form.PAGE_BUILTINS) == [name for name in builtin.names()
                                              if name.startswith(("builtin:toy", "builtin:tiny"))]


def test_the_advanced_section_is_grouped_into_tabs_that_hold_every_advanced_field_once():
    specs = field_specs()
    tabs = advanced_tabs(specs)
    assert list(tabs)[:len(ADVANCED_TABS)] == list(ADVANCED_TABS)  # every named tab holds a field, in order
    placed = [spec.name for items in tabs.values() for spec in items]
    assert sorted(placed) == sorted(spec.name for spec in specs if spec.group == "advanced")
    assert len(placed) == len(set(placed))
    assert max(len(items) for items in tabs.values()) <= 12  # about 40 fields, none of the tabs a long column


def test_a_finished_run_the_page_moved_on_from_is_not_shown_as_the_current_state():
    failed = RunView(job_id="j1", state="failed", output_path="/out/old-run", message="the model is missing")
    assert 'data-state="failed"' in render.status_html(failed)
    moved_on = render.status_html(failed, earlier=True)
    assert 'data-state="idle"' in moved_on and "ls-failed" not in moved_on
    assert "old-run, failed" in moved_on and "the model is missing" not in moved_on
    running = RunView(job_id="j2", state="running", output_path="/out/new", total_steps=10, step=3)
    assert 'data-state="running"' in render.status_html(running, earlier=True)  # a running job is always shown


# ----------------------------------------------------------------------------------------------------
# through gradio_client


@pytest.fixture(scope="module")
def page(tmp_path_factory, model_cache):
    """One launched app: (client, studio, root)."""
    root = tmp_path_factory.mktemp("page")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        demo, studio, url = launch_page("--outputs", str(root / "outputs"))
        client = Client(url, verbose=False, download_files=str(root / "downloads"))
        yield client, studio, root
        client.close()
        studio.shutdown(timeout=30)
        demo.close()


def wait_for(client: Client, job_id: str, done, timeout: float = 120.0) -> dict:
    return wait_for_job(client, job_id, done, timeout)


def live_status(client: Client) -> str:
    """The status HTML of a page's refresh (its first part)."""
    return client.predict(api_name="/refresh")[0]


@pytest.mark.e2e
def test_upload_clears_the_previous_datasets_words_and_says_so(page, tmp_path):
    client = page[0]
    files = [handle_file(str(path)) for path in sorted(make_dataset(tmp_path / "mine").iterdir())]
    folder, report, gallery, words, prompts = client.predict(files, "shapestyle", str(SHAPES_DATASET),
                                                             "a demo prompt", api_name="/upload")
    assert "/uploads/" in folder and len(gallery) == 4
    assert words == "" and prompts == ""
    assert "Cleared the trigger words `shapestyle` and 1 sample prompt of the previous dataset" in report
    _, report, _, words, prompts = client.predict(files, "mine", "", "", api_name="/upload")
    assert words == "mine" and "Cleared" not in report  # typed for this upload: kept


@pytest.mark.e2e
def test_start_refuses_an_unusable_dataset_before_queueing_and_leaves_no_folder(page, tmp_path):
    client, studio, root = page
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValidationError, match="no usable image"):
        client.predict(dataset_path=str(empty), run_name="unusable", steps=2, **TINY, api_name="/start")
    assert client.predict(api_name="/queue") == []
    assert not (root / "outputs" / "unusable").exists()


@pytest.mark.e2e
def test_start_refuses_holding_out_every_image_at_its_field_before_queueing(page, tmp_path):
    """--demo pre-fills the demo's validation_images (3); a dataset of 2 images would keep none to train on."""
    client, studio, root = page
    dataset = make_dataset(tmp_path / "data", count=2)
    with pytest.raises(ValidationError, match="leaves none to train on"):
        client.predict(dataset_path=str(dataset), run_name="all-held-out", steps=2, validation_images="3", **TINY,
                       api_name="/start")
    assert client.predict(api_name="/queue") == []
    assert not (root / "outputs" / "all-held-out").exists()


@pytest.mark.e2e
def test_a_job_that_fails_before_training_stays_listed_as_failed_and_a_new_dataset_moves_the_panel_on(page, tmp_path):
    client, studio, root = page
    dataset = make_dataset(tmp_path / "data")
    answer = client.predict(dataset_path=str(dataset), run_name="never-started", steps=2,
                            **{**TINY, "base_model": str(tmp_path / "no-such-model")}, api_name="/start")
    state = wait_for(client, answer["job_id"], lambda s: s["state"] in TERMINAL)
    assert state["state"] == "failed" and state["error_field"] == "base_model", state  # shown at its field
    assert "no-such-model" in state["message"]
    # the run stays in the Runs list, failed, from Start until it is deleted (its folder holds why)
    listed = {row["id"]: row for row in client.predict(api_name="/runs")[1]}
    assert listed[Path(answer["output_path"]).name]["state"] == "failed"

    fresh = Client(client.src, verbose=False, download_files=str(tmp_path / "downloads"))  # a new page
    try:
        shown = fresh.predict(api_name="/refresh")
        assert 'data-state="failed"' in shown[0]  # the failure is the current state...
        assert run_summary(shown)["state"] == "failed"
        assert run_summary(fresh.predict(api_name="/refresh")) is None  # unchanged since: nothing is sent again
        files = [handle_file(str(path)) for path in sorted(dataset.iterdir())]
        fresh.predict(files, "shapestyle", "", "", api_name="/upload")
        status = live_status(fresh)  # ...until the page has a new dataset
        assert 'data-state="idle"' in status and "never-started, failed" in status
        assert 'data-state="failed"' in live_status(client)  # another page still shows it
    finally:
        fresh.close()


@pytest.mark.e2e
def test_the_run_folder_is_said_before_start_when_the_name_is_taken(page):
    client, studio, root = page
    assert client.predict("fresh-name", api_name="/run_folder") == f"Writes to `{root / 'outputs' / 'fresh-name'}`"
    taken = root / "outputs" / "taken"
    taken.mkdir(parents=True)
    (taken / "events.jsonl").write_text("")
    note = client.predict("taken", api_name="/run_folder")
    assert note == f"Writes to `{root / 'outputs' / 'taken-2'}` (`taken` already holds a run)"
    assert "cannot be used" in client.predict("///", api_name="/run_folder")


@pytest.mark.e2e
def test_no_label_or_button_needs_an_emoji_font_and_the_estimate_sits_by_start(page):
    client, studio, root = page
    config = client.config
    texts = []
    for component in config["components"]:
        props = component.get("props", {})
        texts += [str(props.get(key) or "") for key in ("label", "value", "info")
                  if isinstance(props.get(key), str)]
    assert texts and not [text for text in texts if EMOJI.search(text)]
    estimate = client.predict(dataset_path=str(SHAPES_DATASET), run_name="estimate", steps=4, **TINY,
                              api_name="/estimate")
    assert "Ready to train" in estimate and not EMOJI.search(estimate)
    ids = [component.get("props", {}).get("elem_id") for component in config["components"]]
    assert ids.index("estimate-button") == ids.index("start") + 1  # next to Start, in the Train column
    tabs = [component["props"].get("label") for component in config["components"]
            if (component.get("props", {}).get("elem_id") or "").startswith("advanced-")]
    assert tabs[:len(ADVANCED_TABS)] == list(ADVANCED_TABS)


@pytest.mark.e2e
def test_every_named_endpoint_is_in_the_readmes_api_list(page):
    client = page[0]
    names = {name.lstrip("/") for name in client.view_api(return_format="dict", print_info=False)["named_endpoints"]}
    assert {"grid", "sweep", "run_folder", "start", "runs", "compare"} <= names
    readme = (train_form.ROOT / "README.md").read_text(encoding="utf-8")
    listed = readme[readme.index("Every action has a"):readme.index("docs/webui.md#api-gradio_client")]
    internal = {"model_family", "save_preset", "export_config"}  # the form's helpers, listed in docs/webui.md
    assert [name for name in sorted(names - internal) if f"`{name}`" not in listed] == []


@pytest.mark.e2e
def test_stop_offers_the_lora_so_far_and_the_opened_run_is_cloned_and_resumed_with_its_history(page, tmp_path):
    from gradio_client.exceptions import AppError

    client, studio, root = page
    form = dict(dataset_path=str(make_dataset(tmp_path / "data", count=2)), run_name="to-clone", steps=5000,
                **{**TINY, "learning_rate": 3e-4})
    job = client.predict(**form, api_name="/start")
    wait_for(client, job["job_id"], lambda s: s["state"] == "running" and s["step"] >= 2)
    assert client.predict(api_name="/stop")["stopped"] is True
    stopped = wait_for(client, job["job_id"], lambda s: s["state"] in TERMINAL)
    assert stopped["state"] == "stopped" and stopped["final_path"] is None
    saved = Path(stopped["saved_so_far"])
    assert saved.name == f"lora_step_{stopped['step']}.safetensors" and saved.is_file()
    final = client.predict(api_name="/refresh")[4]  # the Train panel's download button
    assert final["visible"] is True and Path(final["value"]).read_bytes() == saved.read_bytes()
    assert "saved so far" in final["label"]
    run_id = Path(job["output_path"]).name

    values = dict(zip(train_form.FORM_KEYS, client.predict(run_id, api_name="/clone"), strict=True))
    assert values["run_name"] == f"{run_id}-2"  # a new name: the clone never writes into the run it came from
    assert values["learning_rate"] == 3e-4 and values["steps"] == 5000
    assert values["dataset_path"] == form["dataset_path"] and values["trigger_words"] == "shapestyle"

    step = stopped["step"]
    resumed = client.predict(run_id, api_name="/resume_run")
    assert resumed["state"] == "running" and resumed["output_path"] == job["output_path"]
    state = wait_for(client, resumed["job_id"], lambda s: s["state"] == "running" and s["step"] >= step + 2)
    assert state["resumed_at"] == [step]
    assert f"resumed at step {step}" in live_status(client)
    client.predict(api_name="/stop")
    done = wait_for(client, resumed["job_id"], lambda s: s["state"] in TERMINAL)
    assert done["checkpoints"][0] == str(saved)  # the checkpoint from before the resume stays listed
    steps = [point[0] for point in studio.view(resumed["job_id"]).loss_points]
    assert steps[0] == 1 and step in steps and steps[-1] > step  # the history before the resume is kept

    finished = root / "outputs" / "finished-elsewhere"  # a complete run, as the CLI leaves one
    finished.mkdir()
    events = [{"type": "started", "timestamp": "2026-01-01T00:00:00", "total_steps": 2, "num_images": 1,
               "device": "cpu", "mixed_precision": "no", "model_family": "sd15", "output_path": str(finished)},
              {"type": "complete", "timestamp": "2026-01-01T00:01:00", "final_path": str(finished / "x"), "step": 2,
               "total_time": 60.0}]
    (finished / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    with pytest.raises(AppError, match="is complete; only a stopped run can be resumed"):
        client.predict(finished.name, api_name="/resume_run")


@pytest.mark.e2e
def test_a_flux_and_an_sd3_run_train_from_the_page_whose_form_shows_their_options(page, tmp_path):
    """The flow-matching families through the page: the model picker's detection shows the Flow matching
    options for them (and hides them for SD), and a Start on each tiny built-in trains to its LoRA."""
    client, studio, root = page
    specific = [spec for spec in field_specs() if spec.families]  # the fields of some families only
    names = [spec.name for spec in specific]
    assert {"timestep_sampling", "flux_guidance", "use_t5_encoder", "min_snr_gamma"} <= set(names)
    for model, family, words in (("builtin:tiny-flux", "flux", "FLUX.1-dev"), ("builtin:tiny-sd3", "sd3", "SD 3.5"),
                                 ("builtin:tiny-sd", "sd1", "SD 1.x")):
        detected = client.predict(model, api_name="/model_family")
        assert words in detected[0]
        shown = {name: update["visible"] for name, update in zip(names, detected[1:], strict=True)}
        assert shown == {spec.name: spec.applies_to(family) for spec in specific}
    assert shown["min_snr_gamma"] and not shown["timestep_sampling"]  # SD: the DDPM options, not the flow ones
    dataset = make_dataset(tmp_path / "data", count=2)
    for model in ("builtin:tiny-flux", "builtin:tiny-sd3"):
        flow = {**TINY, "base_model": model, "resolution": 64, "bucketing": False, "lora_alpha": 4}
        answer = client.predict(dataset_path=str(dataset), run_name=model.split(":")[1], steps=2, **flow,
                                api_name="/start")
        state = wait_for(client, answer["job_id"], lambda s: s["state"] in TERMINAL, timeout=240)
        assert state["state"] == "complete", (state.get("message"), state.get("error_field"), state.get("stderr_tail"))
        assert (Path(answer["output_path"]) / "lora_final.safetensors").is_file()


@pytest.mark.e2e
def test_a_double_click_on_start_queues_one_job_and_another_page_gets_its_own(page):
    client, studio, root = page
    form = dict(dataset_path=str(SHAPES_DATASET), run_name="twice", steps=2, **TINY)
    first = client.predict(**form, api_name="/start")
    assert client.predict(**form, api_name="/start") == first  # the second click answers the first's job
    other = Client(client.src, verbose=False)
    try:
        own = other.predict(**form, api_name="/start")
    finally:
        other.close()
    assert own["job_id"] != first["job_id"] and own["output_path"] != first["output_path"]
    assert client.predict(own["job_id"], api_name="/cancel")["cancelled"] is True
    ended = wait_for(client, first["job_id"], lambda s: s["state"] in TERMINAL)
    assert ended["state"] == "complete", (ended["message"], ended["stderr_tail"])
    assert [path.name for path in (root / "outputs").iterdir() if path.name.startswith("twice")] == ["twice"]
