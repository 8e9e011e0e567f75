"""Pick the best LoRA: the checkpoint x prompt grid and the strength sweep, drawn from a run's saved files
with diffusers' load_lora_weights (lora_core/grid.py, drawing.py), and the sheet they are laid out on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SHAPES_DATASET, tiny_config
from PIL import Image

from lora_core.events import Error, GridComplete, GridProgress, Interrupted, parse_event
from lora_core.grid import (
    GridError,
    SavedLora,
    pick,
    read_run,
    render_grid,
    render_sweep,
    run_job,
    spread,
)
from lora_core.sheet import BACKGROUND, compose, wrap

PROMPTS = ["shapestyle, a red circle", "a blue square"]
# One LoRA drawn unfused and fused differs only by float rounding ((W + BA)x against Wx + B(Ax)): measured
# here, at most 1 level in 9 of the 196,608 values, against a LoRA effect of up to 71 levels (mean 6.8).
FUSED_MAX_LEVELS, FUSED_MAX_SHARE = 2, 1e-3


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------------------------
# the sheet and the choices (no model)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_the_sheet_puts_each_cell_whole_in_its_box_with_its_labels():
    colors = [[(200, 0, 0), (0, 200, 0), (0, 0, 200)], [(100, 100, 0), (0, 100, 100), (100, 0, 100)]]
    cells = [[solid(color) for color in row] for row in colors]
    sheet, layout = compose(cells, ["step 100", "final (step 200)"], ["a", "b", "a prompt " * 20], "title")
    assert sheet.size == layout.size
    factor = 9  # 30 px cells are drawn 9x (270 px, at least MIN_CELL_SIDE 256), each pixel a 9x9 block
    places = [(r, c) for r in range(2) for c in range(3)]
    boxes = [layout.box(r, c) for r, c in places]
    for (r, c), box in zip(places, boxes, strict=True):
        assert min(box[:2]) >= 0 and box[2] <= sheet.width and box[3] <= sheet.height
        assert (box[2] - box[0], box[3] - box[1]) == (40 * factor, 30 * factor)
        assert np.array_equal(pixels(sheet.crop(box))[::factor, ::factor], pixels(cells[r][c]))
    for one, other in [(a, b) for a in boxes for b in boxes if a < b]:  # no two cells overlap
        assert one[2] <= other[0] or other[2] <= one[0] or one[3] <= other[1] or other[3] <= one[1]
    left_labels = pixels(sheet.crop((0, boxes[0][1], boxes[0][0] - 1, sheet.height)))
    header = pixels(sheet.crop((0, 0, sheet.width, boxes[0][1] - 1)))
    for area in (left_labels, header):  # text was drawn there
        assert (area != np.array(BACKGROUND)).any()
    capped = compose(cells, ["step 100", "final (step 200)"], ["a", "b", "a prompt " * 200], "title")[1]
    assert capped == layout  # a longer label is cut at 4 lines: the sheet does not grow


def test_wrap_keeps_lines_within_the_width_and_cuts_long_text():
    from PIL import ImageFont

    font = ImageFont.load_default(size=12)
    lines = wrap("shapestyle " * 40 + "averyveryverylongwordthatcannotfitinaline", font, 60, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 60 for line in lines)
    assert wrap("", font, 60) == [""]
    with pytest.raises(ValueError, match="same size"):
        compose([[solid((0, 0, 0)), solid((0, 0, 0), (10, 10))]], ["r"], ["a", "b"])


def test_a_label_of_one_100000_character_word_wraps_quickly_and_correctly():
    from PIL import ImageFont
    from timeouts import within

    font = ImageFont.load_default(size=12)
    word = "abcdefghij" * 10_000  # one word: the old wrap measured every prefix of it, cubic in its length
    lines = within(20, wrap, word, font, 60)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines[:3]) == word[:sum(len(line) for line in lines[:3])]  # cut in order, nothing lost
    assert all(font.getlength(line + word[len("".join(lines[:index + 1]))]) > 60 for index, line in
               enumerate(lines[:3]))  # each line is as long as fits: one character more would not
    many = within(20, wrap, "word " * 100_000, font, 60)
    assert len(many) == 4 and many[0].startswith("word word")


def test_the_default_choice_of_checkpoints_is_all_then_spread_evenly(tmp_path):
    assert spread(list(range(5)), 8) == [0, 1, 2, 3, 4]
    assert spread(list(range(20)), 8) == [0, 3, 5, 8, 11, 14, 16, 19]  # first and last always in
    saved = [SavedLora(2, tmp_path / "a", False), SavedLora(4, tmp_path / "b", False),
             SavedLora(6, tmp_path / "c", True)]
    assert pick(saved, ["final", 2, 2], tmp_path) == [saved[2], saved[0]]
    assert pick(saved, None, tmp_path, cap=2) == [saved[0], saved[2]]  # 16 prompts leave room for 4 rows
    with pytest.raises(GridError, match="no LoRA saved at 5; it has step 2, step 4, final \\(step 6\\)") as caught:
        pick(saved, [5], tmp_path)
    assert caught.value.field == "steps"
    with pytest.raises(GridError, match="holds no LoRA yet"):
        pick([], None, tmp_path)


def test_bad_folders_and_options_are_errors_naming_the_field(tmp_path):
    with pytest.raises(GridError, match="no such run folder"):
        read_run(tmp_path / "missing")
    with pytest.raises(GridError, match="no config.json"):
        read_run(tmp_path)
    cases = [("grid", {"seed": -1}, "seed"), ("grid", {"colour": 1}, "colour"),
             ("sweep", {"scales": [0, 9]}, "scales"), ("grid", {"steps": []}, "steps")]
    for kind, options, field in cases:
        events = []
        terminal = run_job(kind, tmp_path, options, events.append)
        assert events == [terminal] and isinstance(terminal, Error) and terminal.field == field, options
    assert run_job("grid", tmp_path / "missing", None, events.append).field == "run"


# ----------------------------------------------------------------------------------------------------
# drawn from a trained run: tiny-sd, a LoRA on the UNet and the text encoder, a checkpoint at step 2 and the
# final LoRA at step 4, high learning rates so that the two differ visibly


pytestmark = pytest.mark.xdist_group("test_grid")  # its tests share trained runs: one xdist worker


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    from lora_core.configfile import parse_config
    from lora_core.training import train

    output = tmp_path_factory.mktemp("grid") / "run"
    config = tiny_config(SHAPES_DATASET, output, steps=4, checkpoint_steps=2, validation_steps=1000,
                         learning_rate=1e-2, train_text_encoder=True, text_encoder_lr=5e-2, batch_size=1,
                         sample_inference_steps=3, sample_prompts=PROMPTS)
    events = []
    train(parse_config(config), events.append, lambda: False)
    assert events[-1].type == "complete"
    return output


@pytest.fixture(scope="module")
def renderer(run_folder):
    """The run's base model, loaded once for the tests that only draw with it (each unloads its LoRA)."""
    from lora_core.drawing import Renderer

    return Renderer(read_run(run_folder)[1])


@pytest.mark.e2e
def test_a_grid_of_two_checkpoints_by_two_prompts(run_folder, renderer):
    events = []
    result = render_grid(run_folder, {"steps": [2, "final"]}, emit=events.append, renderer=renderer)
    assert result.path.parent == run_folder and "grid" in result.path.name
    assert result.row_labels == ["step 2", "final (step 4)"] and result.column_labels == PROMPTS
    with Image.open(result.path) as image:
        assert image.format == "PNG"
        assert image.size == result.layout.size
        assert json.loads(image.text["lora_studio"])["seed"] == 7
        sheet = image.convert("RGB")
    assert result.layout.cell_width == result.layout.cell_height == 256  # the run's resolution
    assert sheet.width > 2 * 256 and sheet.height > 2 * 256
    for row in range(2):
        for column in range(2):
            assert np.array_equal(pixels(sheet.crop(result.layout.box(row, column))),
                                  pixels(result.cells[row][column]))
    for column in range(2):  # the same seed and prompt: the checkpoints make the difference
        assert np.abs(pixels(result.cells[0][column]) - pixels(result.cells[1][column])).mean() > 1.0
    assert [(e.done, e.total, e.row) for e in events] == [(1, 4, "step 2"), (2, 4, "step 2"),
                                                          (3, 4, "final (step 4)"), (4, 4, "final (step 4)")]
    # drawn as the trainer draws its samples: its last sample (first prompt, the run's seed) is the same image
    with Image.open(run_folder / "samples" / "step_4.png") as sample:
        assert np.array_equal(pixels(sample.convert("RGB")), pixels(result.cells[1][0]))


@pytest.mark.e2e
def test_the_sweep_goes_from_the_base_model_to_the_fused_lora(run_folder, renderer):
    from lora_core.drawing import Renderer

    config = renderer.config
    result = render_sweep(run_folder, {"scales": [0, 0.5, 1]}, renderer=renderer)
    assert result.column_labels == ["scale 0 (base model)", "scale 0.5", "scale 1"]
    assert result.row_labels == PROMPTS[:1] and "sweep" in result.path.name
    zero, half, one = (pixels(cell) for cell in result.cells[0])

    base = pixels(renderer.draw(PROMPTS[0], config.seed))  # the sweep unloaded its LoRA: the base model again
    # scale 0 disables the LoRA layers, which then compute the base layer alone: the very same operations
    assert np.array_equal(zero, base)
    fusing = Renderer(config)  # its own copy: fusing changes the base weights
    fusing.pipeline.load_lora_weights(str(run_folder / "lora_final.safetensors"))
    fusing.pipeline.fuse_lora(lora_scale=1.0)
    fusing.pipeline.unload_lora_weights()  # the fused weights stay
    fused = pixels(fusing.draw(PROMPTS[0], config.seed))
    assert np.abs(fused - base).max() > 10 * FUSED_MAX_LEVELS, "the LoRA must change the image for this to mean much"
    difference = np.abs(one - fused)
    assert difference.max() <= FUSED_MAX_LEVELS and (difference > 0).mean() <= FUSED_MAX_SHARE
    assert np.abs(half - zero).mean() > 0.5 and np.abs(half - one).mean() > 0.5  # in between


@pytest.mark.e2e
def test_the_command_line_writes_the_grid_into_the_run_folder(run_folder, capfd):
    from lora_core.grid import main

    before = set(run_folder.glob("grid*.png"))
    code = main(["grid", str(run_folder), "--steps", "final", "--prompts", "a green triangle", "--seed", "3"])
    out, err = capfd.readouterr()
    assert code == 0, err[-2000:]
    events = [parse_event(line) for line in out.splitlines()]  # stdout is nothing but events
    assert [type(e) for e in events] == [GridProgress, GridComplete]
    path = Path(events[-1].path)
    assert set(run_folder.glob("grid*.png")) - before == {path} and str(path) in err
    with Image.open(path) as image:
        assert image.size == (events[-1].width, events[-1].height)
    with Image.open(path) as image:  # what was drawn travels in the PNG
        details = json.loads(image.text["lora_studio"])
    assert details["prompts"] == ["a green triangle"] and details["seed"] == 3
    assert main(["sweep", str(run_folder), "--step", "3"]) == 1  # no such checkpoint: an error event, exit 1
    error = parse_event(capfd.readouterr().out.splitlines()[-1])
    assert isinstance(error, Error) and error.field == "step"


def test_python_m_lora_core_dispatches_grid_and_sweep():
    for command in ("grid", "sweep"):
        done = subprocess.run([sys.executable, "-m", "lora_core", command, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "--seed" in done.stdout and "--prompts" in done.stdout, done.stderr


@pytest.mark.e2e
def test_a_stopped_grid_ends_interrupted_and_writes_nothing(run_folder, renderer):
    before = set(run_folder.iterdir())
    events = []
    terminal = run_job("grid", run_folder, {"steps": ["final"]}, events.append, should_stop=lambda: True,
                       renderer=renderer)
    # asked before the first cell's first denoising step ended: stopped inside it, not after it
    assert isinstance(terminal, Interrupted) and terminal.step == 0 and "0 of 2 cells" in terminal.message
    assert [type(e) for e in events] == [Interrupted]
    assert set(run_folder.iterdir()) == before
    missing = run_job("sweep", run_folder, {"step": 3}, events.append)
    assert isinstance(missing, Error) and missing.field == "step" and "step 2" in missing.message
    assert events[-1] is missing and sum(e.terminal for e in events) == 2  # one per job


@pytest.mark.e2e
def test_an_sdxl_lora_renders_in_a_sweep(tmp_path):
    from lora_core.configfile import parse_config
    from lora_core.training import train

    config = tiny_config(SHAPES_DATASET, tmp_path / "run", steps=2, validation_steps=1000, learning_rate=1e-2,
                         batch_size=1, sample_inference_steps=2)
    config["base_model"] = "builtin:tiny-sdxl"
    events = []
    train(parse_config(config), events.append, lambda: False)
    result = render_sweep(tmp_path / "run", {"scales": [0, 1]})
    assert result.column_labels == ["scale 0 (base model)", "scale 1"] and result.row_labels == ["shapestyle"]
    zero, one = (pixels(cell) for cell in result.cells[0])
    assert zero.shape == (256, 256, 3) and np.abs(one - zero).mean() > 0.5
    # the trainer drew its last sample (the trigger words, the run's seed) from prompt embeddings it encoded
    # itself, with the LoRA in memory: the loaded file at scale 1 gives the same image
    with Image.open(tmp_path / "run" / "samples" / "step_2.png") as sample:
        assert np.array_equal(pixels(sample.convert("RGB")), one)


@pytest.mark.e2e
def test_files_for_another_model_are_refused_by_name(run_folder, renderer, tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_core.errors import UserError

    stranger = tmp_path / "other.safetensors"  # keys of no layer this model has
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 2)}, str(stranger))
    loha = tmp_path / "loha.safetensors"  # LyCORIS names, applied by lorafile rather than loaded by diffusers
    save_file({f"lora_unet_no_such_block.{name}": torch.zeros(8, 2) if name.endswith("_a") else torch.zeros(2, 8)
               for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, str(loha))
    for path in (stranger, loha):
        with pytest.raises(UserError, match=str(path)) as caught:
            renderer.load(path, field="step")
        assert caught.value.field == "step" and renderer.loaded is None
    renderer.load(run_folder / "lora_final.safetensors")  # the renderer still works afterwards
    renderer.unload()


@pytest.mark.e2e
def test_a_loha_lora_is_applied_to_the_weights_and_taken_off_exactly(renderer, tmp_path):
    """diffusers cannot read LoHa: its change is added to the weights (lorafile.apply_lora) and put back."""
    from lora_core.configfile import parse_config
    from lora_core.training import train

    config = tiny_config(SHAPES_DATASET, tmp_path / "run", steps=2, validation_steps=1000, learning_rate=5e-2,
                         batch_size=1, sample_inference_steps=3, network_type="loha", lora_target="locon")
    events = []
    train(parse_config(config), events.append, lambda: False)
    base = pixels(renderer.draw("shapestyle", 7))
    result = render_sweep(tmp_path / "run", {"scales": [0, 1]}, renderer=renderer)
    zero, one = (pixels(cell) for cell in result.cells[0])
    assert np.array_equal(zero, base) and np.abs(one - zero).max() > 10 * FUSED_MAX_LEVELS
    # the trainer's last sample is peft's LoHa computed beside the weight; applied, it is merged into it
    with Image.open(tmp_path / "run" / "samples" / "step_2.png") as sample:
        difference = np.abs(pixels(sample.convert("RGB")) - one)
    assert difference.max() <= FUSED_MAX_LEVELS and (difference > 0).mean() <= FUSED_MAX_SHARE
    assert np.array_equal(pixels(renderer.draw("shapestyle", 7)), base)  # the base weights are back, exactly
