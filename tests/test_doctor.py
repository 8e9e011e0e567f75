"""The dataset doctor: each planted defect is found and names its file, a clean set gives nothing, the CLI's
JSON, the leakage check through a config, and the one-click fixes (which never delete a user's file)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from doctor_data import TRIGGER, clean, planted, reencoded
from helpers import ROOT
from PIL import Image

from lora_core import dataset, doctor, doctor_fixes, imagehash
from lora_core.doctor_captions import EncoderLimit, estimate_tokens


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def planted_template(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("planted") / "set"
    return folder, planted(folder)


@pytest.fixture
def planted_set(planted_template, tmp_path) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the planted dataset (tests change it)."""
    folder = tmp_path / "set"
    shutil.copytree(planted_template[0], folder)
    return folder, planted_template[1]


def kinds_by_file(result: doctor.Result) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for finding in result.findings:
        for name in finding.files:
            found.setdefault(name, set()).add(finding.kind)
    return found


def test_each_planted_defect_is_found_naming_its_file(planted_set):
    folder, files = planted_set
    result = doctor.examine(folder)
    found = kinds_by_file(result)
    for kind, name in files.items():
        assert kind in found.get(name, set()), f"{kind} not reported for {name}: {found.get(name)}"
    for kind in ("converted",):  # the 16-bit and the palette image are conversions too
        assert kind in found["deep.png"] and kind in found["indexed.png"]
    assert "clean_0000.png" in next(f.files for f in result.findings if f.kind == "duplicate")
    assert "clean_0001.png" in next(f.files for f in result.findings if f.kind == "near_duplicate")
    clean_names = {f"clean_{i:04d}.png" for i in range(2, 12)}
    assert not clean_names & set(found), {name: found[name] for name in clean_names & set(found)}
    for finding in result.findings:
        assert finding.message and finding.why and finding.fix and finding.severity in doctor.SEVERITIES


def test_a_clean_dataset_has_no_findings(tmp_path):
    clean(tmp_path / "set", 14)
    clean(tmp_path / "set", 4, suffix=".jpg", first_seed=50)
    result = doctor.examine(tmp_path / "set")
    assert result.findings == [] and result.num_images == 18


def test_the_projects_shapes_set_has_no_image_findings_and_a_blurred_shape_is_found(tmp_path):
    from helpers import SHAPES_DATASET
    from PIL import ImageFilter

    folder = tmp_path / "shapes"
    shutil.copytree(SHAPES_DATASET, folder)
    assert {f.kind for f in doctor.examine(folder).findings} == {"caption_missing"}  # shape_06 has none
    with Image.open(folder / "shape_03.png") as image:
        blurred = image.filter(ImageFilter.GaussianBlur(2))
    blurred.save(folder / "shape_03.png")
    (tmp_path / "elsewhere.png").write_bytes((folder / "shape_01.png").read_bytes())
    (folder / "outside.png").symlink_to(tmp_path / "elsewhere.png")
    found = kinds_by_file(doctor.examine(folder))
    assert found["shape_03.png"] == {"blurry"} and found["outside.png"] == {"unreadable"}
    assert set(found) == {"shape_03.png", "outside.png", "shape_06.jpg"}


def test_the_second_look_uses_the_cache_and_finds_the_same(planted_set, monkeypatch):
    folder, files = planted_set
    first = doctor.examine(folder)
    monkeypatch.setattr(imagehash, "measure", lambda *a: pytest.fail("measured again despite the cache"))
    second = doctor.examine(folder)
    assert [f.to_dict() for f in first.findings] == [f.to_dict() for f in second.findings]
    assert len(first.findings) >= len(files)


@pytest.mark.e2e  # a subprocess that imports torch: about 5 s
def test_cli_json_and_leakage_between_training_and_held_out_images(tmp_path):
    clean(tmp_path / "train", 8)
    held = tmp_path / "held"
    clean(held, 2, first_seed=40)
    reencoded(tmp_path / "train" / "clean_0003.png", scale=0.8, quality=80).save(held / "leak.jpg")
    config = {"dataset_path": "elsewhere", "base_model": "builtin:tiny-sd", "output_path": str(tmp_path / "out"),
              "trigger_words": [TRIGGER], "resolution": 256, "validation_dataset_path": str(held)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = subprocess.run([sys.executable, "-m", "lora_core", "doctor", str(tmp_path / "train"), "--config",
                          str(tmp_path / "config.json"), "--json", "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    findings = json.loads(run.stdout)
    assert [f["kind"] for f in findings] == ["leakage"]
    assert findings[0]["files"] == ["clean_0003.png", "held/leak.jpg"] and findings[0]["severity"] == "error"
    assert set(findings[0]) >= {"kind", "files", "message", "why", "fix", "severity"}


def test_held_out_images_of_the_dataset_itself_are_checked_for_leakage(tmp_path):
    from lora_core import holdout

    clean(tmp_path / "set", 10)
    (tmp_path / "set" / "again.png").write_bytes((tmp_path / "set" / "clean_0002.png").read_bytes())
    (tmp_path / "set" / "broken.png").write_bytes(b"not an image")  # training refuses it: it is not held out
    config = doctor.TrainConfig(dataset_path=str(tmp_path / "set"), base_model="builtin:tiny-sd",
                                output_path=str(tmp_path / "o"), trigger_words=[TRIGGER], validation_images=0.5)
    report = dataset.scan(config.dataset_path, config.trigger_words)
    held = {Path(record.path).name for record in holdout.split(report, config).images}
    assert len(held) == 6
    readable = [path for path in doctor.image_files(tmp_path / "set") if path.name != "broken.png"]
    assert {path.name for path in doctor._held_out_of(readable, tmp_path / "set", 0.5)} == held
    result = doctor.examine(tmp_path / "set", doctor.target_from_config(config))
    pair = {"again.png", "clean_0002.png"}
    kinds = {f.kind for f in result.findings if set(f.files) == pair}
    assert kinds == ({"leakage"} if len(pair & held) == 1 else {"duplicate"})
    leaked = {name for f in result.findings if f.kind == "leakage" for name in f.files}
    assert leaked <= pair and (not leaked or leaked & held)


def test_caption_limits_come_from_the_config(tmp_path):
    clean(tmp_path / "set", 6)
    (tmp_path / "set" / "clean_0000.txt").write_text(" ".join(["word"] * 70))
    config = doctor.TrainConfig(dataset_path=str(tmp_path / "set"), base_model="builtin:tiny-sd",
                                output_path=str(tmp_path / "o"), trigger_words=["a long trigger phrase here"])
    long = [f for f in doctor.examine(tmp_path / "set", doctor.target_from_config(config)).findings
            if f.kind == "caption_too_long"]
    assert [f.files for f in long] == [["clean_0000.png"]]  # 70 words fit alone, not after the trigger
    assert "word" in long[0].message and "CLIP" in long[0].message
    assert not [f for f in doctor.examine(tmp_path / "set").findings if f.kind == "caption_too_long"]


def test_the_token_estimate_and_what_is_cut():
    clip = EncoderLimit("CLIP", 77)
    assert estimate_tokens("a photo of a dog", clip).tokens == 7
    count = estimate_tokens(" ".join(f"w{i}" for i in range(40)), clip)  # a letter and a digit (or two) each
    assert count.tokens > 77 and count.cut.startswith("w") and not estimate_tokens("short", clip).cut
    assert estimate_tokens("x " * 300, EncoderLimit("T5", 512)).cut == ""


def test_exclude_is_honoured_by_the_scan_and_undone_by_include(tmp_path):
    folder = tmp_path / "set"
    clean(folder, 3)
    assert doctor_fixes.exclude(folder, ["clean_0001.png"]) == ["clean_0001.png"]
    assert doctor_fixes.exclude(folder, ["clean_0001.png"]) == []
    report = dataset.scan(folder, ["t"])
    assert [Path(r.path).name for r in report.images] == ["clean_0000.png", "clean_0002.png"]
    assert report.refused == [{"file": "clean_0001.png", "reason": dataset.EXCLUDED_REASON}]
    assert (folder / "clean_0001.png").is_file() and doctor.examine(folder).num_images == 2
    assert doctor_fixes.include(folder, ["clean_0001.png"]) == ["clean_0001.png"]
    assert doctor_fixes.include(folder, ["clean_0001.png"]) == []
    assert len(dataset.scan(folder, ["t"]).images) == 3
    for bad in ("../x.png", "/etc/passwd", "", ".."):
        with pytest.raises(doctor_fixes.FixError):
            doctor_fixes.exclude(folder, [bad])


def test_add_trigger_puts_it_first_where_it_is_missing(planted_set):
    folder, files = planted_set
    changed = doctor_fixes.add_trigger(folder, [files["trigger_missing"], files["caption_missing"],
                                                "clean_0002.png"], TRIGGER)
    assert changed == [files["trigger_missing"], files["caption_missing"]]
    assert (folder / "no_trigger.txt").read_text().startswith(f"{TRIGGER}, ")
    assert (folder / "no_caption.txt").read_text() == TRIGGER
    kinds = {f.kind for f in doctor.examine(folder).findings}
    assert "trigger_missing" not in kinds and "caption_missing" not in kinds


def test_convert_writes_an_rgb_png_beside_the_original_and_excludes_it(planted_set):
    folder, files = planted_set
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    made = [doctor_fixes.convert(folder, name) for name in ("print.jpg", "deep.png", "sideways.jpg")]
    made.append(doctor_fixes.convert(folder, files["transparent"], background=(0, 128, 0)))
    assert made == ["print_rgb.png", "deep_rgb.png", "sideways_rgb.png", "cutout_rgb.png"]
    for name in made:
        with Image.open(folder / name) as image:
            assert image.mode == "RGB" and image.format == "PNG"
        assert (folder / name).with_suffix(".txt").is_file()
    with Image.open(folder / "sideways_rgb.png") as image:
        assert image.size == (384, 448)  # the EXIF rotation baked in
        assert image.getpixel((0, 0)) != (0, 128, 0)
    with Image.open(folder / "cutout_rgb.png") as image:
        assert image.getpixel((0, 0)) == (0, 128, 0)
    assert all((folder / name).read_bytes() == data for name, data in before.items() if name != dataset.EXCLUDE_FILE)
    found = kinds_by_file(doctor.examine(folder))
    assert not any(name in found for name in made) and "print.jpg" not in found


def test_plan_findings_go_in_the_dataset_event(planted_set, tmp_path):
    from types import SimpleNamespace

    from lora_core.events import dataset_event, event_from_dict

    folder, files = planted_set
    config = doctor.TrainConfig(dataset_path=str(folder), base_model="builtin:tiny-sd", trigger_words=[TRIGGER],
                                output_path=str(tmp_path / "out"), resolution=256)
    report = dataset.scan(folder, config.trigger_words)
    held = dataset.DatasetReport(folder=str(folder), images=[r for r in report.images
                                                             if Path(r.path).name == "clean_0001.png"])
    plan = SimpleNamespace(config=config, info=SimpleNamespace(family="sd1", pixel_multiple=64), held_out=held)
    findings = doctor.plan_findings(plan)
    event = event_from_dict(json.loads(dataset_event(report, held, findings=findings).to_json()))
    # at 256 px tiny.png is not enlarged 2x; the trigger is put first by the config; clean_0001 is held out
    expected = set(files) - {"upscaled", "trigger_missing", "near_duplicate"} | {"leakage"}
    assert event.findings == findings and {f["kind"] for f in findings} == expected
    assert {"kind": "leakage", "files": ["near_copy.jpg", "clean_0001.png"]}.items() <= next(
        f for f in findings if f["kind"] == "leakage").items()
    assert dataset_event(report).findings == []
    broken = SimpleNamespace(config=config, info=None, held_out=None)
    assert doctor.plan_findings(broken) == []


def test_the_report_shows_the_findings_of_the_dataset_event(tmp_path):
    from lora_core.eventlog import EventLog
    from lora_core.events import Complete, Dataset, Started
    from lora_core.report import write_report

    def record(output: Path, findings: list[dict]) -> str:
        log = EventLog(output / "events.jsonl")
        log(Started(total_steps=1, num_images=6, device="cpu", mixed_precision="no", model_family="SD 1.x",
                    output_path=str(output), num_processes=1, gradient_checkpointing=False, compile_unet="off",
                    cuda_graphs=False))
        log(Dataset(num_images=6, num_captioned=6, refused=[], num_refused=0, ignored=[], num_ignored=0,
                    warnings=[], findings=findings))
        log(Complete(final_path=str(output / "lora_final.safetensors"), total_time=1.0, step=1))
        log.close()
        return write_report(output).read_text(encoding="utf-8")

    finding = doctor.Finding("blurry", ["soft<1>.png"], "blurry: its detail ratio is 1.05", "soft LoRA",
                             "replace it", "warning", ["exclude"])
    page = record(tmp_path / "run", [finding.to_dict()])
    assert "<h2>Dataset doctor</h2>" in page and "soft&lt;1&gt;.png" in page and "detail ratio is 1.05" in page
    assert "Dataset doctor" not in record(tmp_path / "plain", [])


@pytest.mark.e2e  # loads transformers' tokenizer: about 5 s
def test_a_local_models_own_clip_tokenizer_counts_exactly_and_a_t5_family_adds_its_limit(tmp_path, monkeypatch):
    from lora_core.builtin import write_tokenizer
    from lora_core.doctor_captions import TokenCounter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # transformers 5 makes an empty tokenizer for it
    assert TokenCounter.from_model("someone/not-in-the-cache").tokenizer is None

    model = tmp_path / "model"
    write_tokenizer(model / "tokenizer")  # byte-level: a letter is a token, the last of a word with </w>
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    clean(tmp_path / "set", 5)
    (tmp_path / "set" / "clean_0000.txt").write_text("a dog " + "x" * 80 + " lost words")
    config = doctor.TrainConfig(dataset_path=str(tmp_path / "set"), base_model=str(model), trigger_words=[TRIGGER],
                                output_path=str(tmp_path / "o"), trigger_placement="none")
    target = doctor.target_from_config(config)
    count = target.counter.count("a dog", doctor.CLIP_LIMIT)
    assert (count.tokens, count.exact, count.cut) == (6, True, "")  # start, a, d, o, g, end
    long = [f for f in doctor.examine(tmp_path / "set", target).findings if f.kind == "caption_too_long"]
    assert long[0].files == ["clean_0000.png"] and "is 95 CLIP tokens" in long[0].message
    assert "never sees: “xxx" in long[0].message and "lost words" in long[0].message
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert [(limit.name, limit.tokens) for limit in doctor.target_from_config(config).limits] == [
        ("CLIP", 77), ("T5", 512)]


def test_captions_that_are_only_the_trigger_are_not_near_identical_but_others_are(tmp_path):
    clean(tmp_path / "set", 6)
    for i in range(6):
        (tmp_path / "set" / f"clean_{i:04d}.txt").write_text(TRIGGER)  # a common style-LoRA practice
    assert doctor.examine(tmp_path / "set").findings == []
    (tmp_path / "set" / "clean_0001.txt").write_text(f"{TRIGGER}, a man in a red coat walking a dog")
    (tmp_path / "set" / "clean_0002.txt").write_text(f"{TRIGGER}, a man in a red coat, walking a dog")
    assert [(f.kind, f.files) for f in doctor.examine(tmp_path / "set").findings] == [
        ("similar_captions", ["clean_0001.png", "clean_0002.png"])]


def test_similar_caption_pairs_by_prefix_filtering_equal_all_pairs():
    import random

    from lora_core.doctor_captions import _similar_pairs

    rng = random.Random(2)
    vocab = [f"w{i}" for i in range(16)]
    for _ in range(100):
        bags = [frozenset(rng.sample(vocab, rng.randint(1, 12))) for _ in range(25)]
        for threshold in (0.5, 0.8, 0.9, 1.0):
            every = {(i, j) for i in range(25) for j in range(i + 1, 25)
                     if len(bags[i] & bags[j]) >= threshold * len(bags[i] | bags[j]) - 1e-9}
            assert {tuple(sorted(pair)) for pair in _similar_pairs(bags, threshold)} == every
    nine_of_ten = [frozenset(f"w{i}" for i in range(10)), frozenset(f"w{i}" for i in range(9))]
    assert _similar_pairs(nine_of_ten, 0.9) == [(1, 0)]  # exactly 0.9 counts, despite 0.9 * 10 > 9 in floats


def test_main_prints_text_or_json_and_takes_thresholds(planted_set, capsys):
    folder, files = planted_set
    assert doctor.main([str(folder), "--json", "--set", "max_upscale=5"]) == 1
    kinds = {finding["kind"] for finding in json.loads(capsys.readouterr().out)}
    assert kinds == set(files) - {"upscaled"}  # 160x150 is enlarged 3.4x: under 5
    assert doctor.main([str(folder), "--set", "no_such=1"]) == 2 and "no_such" in capsys.readouterr().err
    assert doctor.main([str(folder / "missing")]) == 2
    clean(folder.parent / "clean", 3)
    assert doctor.main([str(folder.parent / "clean")]) == 0
    assert "3 images, 0 finding(s)" in capsys.readouterr().out


def test_large_palette_1bit_and_16bit_images_are_measured_not_called_damaged(tmp_path):
    import numpy as np
    from doctor_data import scene

    folder = tmp_path / "set"
    folder.mkdir()
    size = (1100, 1050)  # the shorter side over twice 512: the decode is reduced
    scene(1, size).quantize(64).save(folder / "palette.png")
    scene(2, size).convert("1").save(folder / "bits.png")
    Image.fromarray(np.asarray(scene(3, size).convert("L"), np.uint16) * 257).save(folder / "deep.png")
    found = kinds_by_file(doctor.examine(folder))
    assert "unreadable" not in set().union(*found.values()), found
    assert found["palette.png"] == {"converted"} and found["deep.png"] == {"converted"}


def test_a_t5_family_checks_captions_against_t5s_length_too(tmp_path):
    from types import SimpleNamespace

    clean(tmp_path / "set", 5)
    (tmp_path / "set" / "clean_0000.txt").write_text(" ".join(["photograph"] * 200) + " never read")
    config = doctor.TrainConfig(dataset_path=str(tmp_path / "set"), base_model="builtin:tiny-sd",
                                output_path=str(tmp_path / "o"), trigger_words=[TRIGGER], resolution=256)
    target = doctor.target_from_config(config, family="sd3")
    assert [(limit.name, limit.tokens) for limit in target.limits] == [("CLIP", 77), ("T5", 256)]
    long = {f.message.split(";")[0]: f.files for f in doctor.examine(tmp_path / "set", target).findings
            if f.kind == "caption_too_long"}
    # the scan keeps 2,000 characters: 181 ten-letter words, each about 2 tokens for either encoder
    assert long == {"the caption is about 368 CLIP tokens": ["clean_0000.png"],
                    "the caption is about 367 T5 tokens": ["clean_0000.png"]}
    plan = SimpleNamespace(config=config, info=SimpleNamespace(family="flux", pixel_multiple=16), held_out=None)
    long = {f["message"].split(";")[0] for f in doctor.plan_findings(plan) if f["kind"] == "caption_too_long"}
    assert long == {"the caption is about 368 CLIP tokens"}  # FLUX reads 512 T5 tokens
