"""The validation loss on held-out images (lora_core/validation.py): options, the split, the event and its curve.

The training tests share one trained run with validation and one without (module fixtures, tiny-sd, 4 steps).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SHAPES_DATASET, tiny_config, train_tapped
from PIL import Image
from safetensors.torch import load_file

from lora_core import dataset, holdout, report
from lora_core.config import ConfigError
from lora_core.configfile import parse_config
from lora_core.eventlog import EventLog, read_events
from lora_core.events import ValidationLoss, dataset_event
from lora_core.plan import make_plan
from lora_core.runrecord import RunRecord
from lora_core.setup import setup
from lora_core.tracking import TensorBoardTracker
from lora_core.training import train
from studio import jobview, runs
from studio.runs_page import RunsTab

STEPS, EVERY = 4, 2
OPTIONS = dict(steps=STEPS, checkpoint_steps=1000, validation_steps=1000, validation_loss_steps=EVERY,
               lora_dropout=0.1)  # dropout draws on the global RNG while training: validation must not


def problems_of(**options) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(tiny_config(SHAPES_DATASET, "/tmp/unused", **options))
    return dict(caught.value.problems)


# ----------------------------------------------------------------------------------------------------
# options and the split (no training)


@pytest.mark.parametrize("value, words", [(0, "count of images"), (-2, "count of images"), (2.5, "neither a whole"),
                                          (True, "not true/false"), ("0.2", "a number"), (10**6, "at most")])
def test_a_bad_validation_images_value_is_an_error_naming_the_field(value, words):
    problems = problems_of(validation_images=value)
    assert list(problems) == ["validation_images"] and words in problems["validation_images"]


def test_counts_fractions_and_conflicting_options():
    assert parse_config(tiny_config(SHAPES_DATASET, "/tmp/o", validation_images=2)).validation_images == 2
    assert parse_config(tiny_config(SHAPES_DATASET, "/tmp/o", validation_images=3.0)).validation_images == 3
    assert parse_config(tiny_config(SHAPES_DATASET, "/tmp/o", validation_images=0.25)).validation_images == 0.25
    both = problems_of(validation_images=1, validation_dataset_path="/tmp/held")
    assert set(both) == {"validation_images", "validation_dataset_path"} and "not both" in both["validation_images"]
    same = problems_of(validation_dataset_path=str(SHAPES_DATASET) + "/")
    assert "dataset_path itself" in same["validation_dataset_path"]
    assert "validation_loss_steps" in problems_of(validation_loss_steps=-1)


def scanned() -> dataset.DatasetReport:
    return dataset.scan(SHAPES_DATASET, ["shapestyle"])


def test_the_held_out_images_leave_the_training_set_and_depend_on_names_not_the_seed():
    config = parse_config(tiny_config(SHAPES_DATASET, "/tmp/o", validation_images=2))
    train_part = scanned()
    held = holdout.split(train_part, config)
    names = [Path(r.path).name for r in held.images]
    assert len(names) == 2 and len(train_part.images) == 4
    assert not set(names) & {Path(r.path).name for r in train_part.images}
    again = scanned()
    again.images.reverse()  # another order, another seed: the same images
    other = holdout.split(again, config.model_copy(update={"seed": 123}))
    assert sorted(Path(r.path).name for r in other.images) == sorted(names)
    fraction = holdout.split(scanned(), config.model_copy(update={"validation_images": 0.5}))
    assert len(fraction.images) == 3
    tiny_fraction = holdout.split(scanned(), config.model_copy(update={"validation_images": 0.01}))
    assert len(tiny_fraction.images) == 1  # at least one


def test_holding_out_every_image_or_a_missing_folder_is_an_error_naming_the_field(tmp_path):
    config = parse_config(tiny_config(SHAPES_DATASET, "/tmp/o", validation_images=6))
    with pytest.raises(holdout.HeldOutError) as caught:
        holdout.split(scanned(), config)
    assert caught.value.field == "validation_images" and "leaves none to train on" in str(caught.value)
    missing = config.model_copy(update={"validation_images": None, "validation_dataset_path": str(tmp_path / "no")})
    with pytest.raises(holdout.HeldOutError) as caught:
        holdout.split(scanned(), missing)
    assert caught.value.field == "validation_dataset_path" and "not a folder" in str(caught.value)
    (tmp_path / "empty").mkdir()
    empty = missing.model_copy(update={"validation_dataset_path": str(tmp_path / "empty")})
    with pytest.raises(holdout.HeldOutError) as caught:
        holdout.split(scanned(), empty)
    assert caught.value.field == "validation_dataset_path" and "no usable image" in str(caught.value)


def test_the_plan_trains_without_the_held_out_images_and_the_dataset_event_counts_them(tmp_path):
    plan = make_plan(parse_config(tiny_config(SHAPES_DATASET, tmp_path / "out", validation_images=2)))
    event = dataset_event(plan.dataset, plan.held_out)
    assert event.num_images == 4 and event.num_validation_images == 2 and len(event.validation_files) == 2
    assert not set(event.validation_files) & {Path(r.path).name for r in plan.dataset.images}
    assert len(plan.assigned) == 4  # buckets (and so batches) only for the training images


# ----------------------------------------------------------------------------------------------------
# the curve's readers (events written by hand)


def curve_events() -> list:
    from lora_core.events import Progress, Started

    events = [Started(total_steps=4, num_images=4, device="cpu", mixed_precision="no", model_family="SD 1.x",
                      output_path="x")]
    for step in range(1, 5):
        events.append(Progress(step=step, total_steps=4, loss=1.0 / step, percent=25.0 * step, lr=1e-4,
                               it_per_s=1.0, eta_s=0.0, epoch=0))
        if step % 2 == 0:
            events.append(ValidationLoss(step=step, loss=0.9 - 0.1 * step))
    return events


def test_the_report_draws_the_validation_curve_beside_the_loss(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    for event in curve_events():
        log(event)
    log.close()
    assert [e.loss for e in read_events(tmp_path / "events.jsonl") if e.type == "validation"] == [0.7, 0.5]
    page = report.write_report(tmp_path).read_text()
    assert page.count('class="second-dot"') == 2 and "validation loss (held-out images)" in page
    assert "0.7 at step 2 → 0.5 at step 4" in page
    record = RunRecord().add_all(curve_events())
    assert record.validation_points == [(2, 0.7), (4, 0.5)]


def test_the_page_and_runs_view_plot_a_second_line_and_tensorboard_gets_a_scalar(tmp_path):
    from studio.render import loss_frame

    view = jobview.RunView().add_all(curve_events())
    assert [loss for _, loss in view.validation_points] == [0.7, 0.5]
    assert set(loss_frame(view)["line"]) == {"training"}  # the live plot: one series (see loss_frame)
    folder = tmp_path / "outputs" / "run1"
    log = EventLog(folder / "events.jsonl")
    for event in curve_events():
        log(event)
    log.close()
    assert runs.run_detail(tmp_path / "outputs", "run1").validation_points == [(2, 0.7), (4, 0.5)]
    plot = RunsTab(tmp_path / "outputs", running=set).opened("run1")["plot"]
    assert plot[plot["line"] == "validation (held-out)"]["loss"].tolist() == [0.7, 0.5]

    class Writer:  # the SummaryWriter's one method used here (tensorboard is not installed in the test venv)
        scalars: list = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    tracker = object.__new__(TensorBoardTracker)
    tracker.writer, tracker._warned, tracker._prompts = Writer(), False, {}
    tracker(ValidationLoss(step=6, loss=0.25))
    assert Writer.scalars == [("validation/loss", 0.25, 6)]


# ----------------------------------------------------------------------------------------------------
# training (one run with validation, one without)


pytestmark = pytest.mark.xdist_group("test_validation_loss")  # its tests share trained runs: one xdist worker


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory) -> Path:
    """Two images that are not in the training set: demo pictures turned a quarter, with captions."""
    folder = tmp_path_factory.mktemp("held-out")
    for name in ("shape_01.png", "shape_04.jpg"):
        Image.open(SHAPES_DATASET / name).rotate(90).save(folder / f"turned_{Path(name).stem}.png")
        shutil.copy(SHAPES_DATASET / f"{Path(name).stem}.txt", folder / f"turned_{Path(name).stem}.txt")
    return folder


@pytest.fixture(scope="module")
def with_validation(tmp_path_factory, held_out_folder):
    out = tmp_path_factory.mktemp("with") / "out"
    config = parse_config(tiny_config(SHAPES_DATASET, out, validation_dataset_path=str(held_out_folder), **OPTIONS))
    events, kept = [], {}
    result = train_tapped(config, lambda run: kept.setdefault("run", run), emit=events.append)
    return config, kept["run"], events, result


@pytest.fixture(scope="module")
def without_validation(tmp_path_factory):
    out = tmp_path_factory.mktemp("without") / "out"
    events: list = []
    result = train(parse_config(tiny_config(SHAPES_DATASET, out, **OPTIONS)), events.append, lambda: False)
    return events, result


def losses(events: list, kind: str = "progress") -> list[tuple[int, float]]:
    return [(e.step, e.loss) for e in events if e.type == kind]


@pytest.mark.e2e
def test_the_validation_event_comes_at_its_cadence_and_at_the_end(with_validation):
    _, run, events, _ = with_validation
    values = losses(events, "validation")
    assert [step for step, _ in values] == [0, 2, 4]  # before the first step, every 2 and at the end
    assert all(math.isfinite(loss) and loss > 0 for _, loss in values)
    dataset_events = [e for e in events if e.type == "dataset"]
    assert dataset_events[0].num_images == 6 and dataset_events[0].num_validation_images == 2
    assert sorted(dataset_events[0].validation_files) == ["turned_shape_01.png", "turned_shape_04.png"]


@pytest.mark.e2e
def test_the_same_weights_give_the_same_value_every_time(with_validation):
    _, run, events, _ = with_validation
    first, second = run.held_out.loss(run), run.held_out.loss(run)
    assert first == second == losses(events, "validation")[-1][1]  # the weights after the last step


@pytest.mark.e2e
def test_validation_does_not_change_the_training_trajectory(with_validation, without_validation):
    _, _, events, result = with_validation
    plain_events, plain = without_validation
    assert losses(events) == losses(plain_events)  # bit-identical floats, step by step
    ours, theirs = load_file(str(result.final_path)), load_file(str(plain.final_path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.e2e
def test_after_a_resume_the_history_stays_and_the_values_are_those_of_an_uninterrupted_run(tmp_path,
                                                                                          with_validation):
    config, _, events, _ = with_validation
    config = config.model_copy(update={"output_path": str(tmp_path / "out")})
    log = EventLog(tmp_path / "out" / "events.jsonl")
    seen: list = []

    def emit(event):
        seen.append(event)
        log(event)

    first = train(config, emit, lambda: any(e.type == "progress" and e.step >= 3 for e in seen))
    assert first.interrupted
    train(config, emit, lambda: False, resume=True)
    log.close()
    recorded = losses(read_events(tmp_path / "out" / "events.jsonl"), "validation")
    assert recorded == losses(events, "validation")  # step 2 from before the stop, step 4 after: equal values


@pytest.fixture(scope="module")
def untrained_values(held_out_folder, tmp_path_factory) -> dict[str, float]:
    """The held-out value of each base model before any step, with the default latent cache (memory)."""
    values = {}
    for model in ("builtin:tiny-sd", "builtin:tiny-sdxl"):
        data = tiny_config(SHAPES_DATASET, tmp_path_factory.mktemp("untrained") / "out",
                           validation_dataset_path=str(held_out_folder), **OPTIONS)
        data["base_model"] = model
        run = setup(make_plan(parse_config(data)))
        values[model] = run.held_out.loss(run)
    return values


@pytest.mark.e2e
@pytest.mark.parametrize("options", [dict(latent_cache="disk"), dict(latent_cache="off"),
                                     dict(train_text_encoder=True),
                                     dict(base_model="builtin:tiny-sdxl", latent_cache="off")],
                         ids=["disk", "off", "text-encoder", "sdxl"])
def test_every_latent_source_a_text_encoder_lora_and_sdxl_give_the_untrained_models_value(
        tmp_path, held_out_folder, untrained_values, options):
    """Before any step the LoRA is zero, so the value is the base model's: the same whatever the latent source
    or whether the captions go through a (zero) text-encoder LoRA; SDXL's size/crop conditioning works."""
    data = tiny_config(SHAPES_DATASET, tmp_path / "out", validation_dataset_path=str(held_out_folder), **OPTIONS)
    data["base_model"] = options.get("base_model", "builtin:tiny-sd")
    data["training_params"].update({k: v for k, v in options.items() if k != "base_model"})
    run = setup(make_plan(parse_config(data)))
    value = run.held_out.loss(run)
    assert math.isfinite(value) and value == pytest.approx(untrained_values[data["base_model"]], rel=1e-5)
    assert run.held_out.loss(run) == value
