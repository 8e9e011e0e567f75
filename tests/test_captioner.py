"""Captioning a dataset by a real model (lora_core/captioner.py, caption_model.py), offline: tiny random models
built from their configs (Florence-2: a DaViT and a BART; BLIP: a ViT and a BERT decoder; Idefics3, SmolVLM's
architecture: a SigLIP-like tower and a Llama, asked through a chat template), their tokenizers and image
processors built in code, saved with save_pretrained and loaded by the captioner's own from_pretrained path.
Their captions are nonsense; the loading, preprocessing, batching, generation, decoding and atomic writing are
the real ones."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import wait_until
from PIL import Image

from lora_core.captioner import Captioner, plan_folder, run_job, with_prefix
from lora_core.eventlog import read_events
from lora_core.events import CaptionComplete, CaptionProgress, CaptionStarted, Error, Event, Interrupted, parse_event

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def byte_level_vocab(folder: Path, first: dict[str, int]) -> tuple[str, str]:
    """vocab.json and merges.txt of a byte-level BPE without merges: every text encodes, one token a byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab = dict(first)
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def build_tiny_florence2(folder: Path) -> Path:
    """A random Florence-2 and its processor, saved as a hub checkpoint would be."""
    import torch
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    tokenizer = BartTokenizer(*byte_level_vocab(folder, {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}),
                              extra_special_tokens={"image_token": "<image>"})
    # 64 px through strides 4*2*2*2 gives 2x2 image features plus the pooled one: 5 image tokens
    image_processor = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False,
                                            image_seq_length=5)
    image_processor.image_seq_length = 5
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    text = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2],
                                   num_groups=[1, 1, 2, 2], window_size=2, projection_dim=16, drop_path_rate=0.0,
                                   max_position_embeddings=8, max_temporal_embeddings=4)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(Florence2Config(text_config=text, vision_config=vision,
                                                              image_token_id=tokenizer.image_token_id)).eval()
    # A random model may end at once or say only special tokens: make it say a few printable ones.
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [0, 1, 3, tokenizer.image_token_id]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_blip(folder: Path) -> Path:
    """A random BLIP captioner (ViT + BERT decoder) with a WordPiece tokenizer of a few words."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "dog", "photo", "of", "red", "on", "grass"]
    (folder / "vocab.txt").write_text("\n".join(words + list("bcdefghijklmnopqrstuvwxyz")) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
           "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.sep_token_id}
    text = BlipTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=64, **ids)
    vision = BlipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=16)).eval()
    model.generation_config.min_new_tokens = 3
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:{% for content in "
                 "message['content'] %}{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}"
                 "{{ content['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


def build_tiny_idefics3(folder: Path) -> Path:
    """A random Idefics3 (the architecture of SmolVLM): a chat model, asked through its chat template."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Qwen2Tokenizer
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>"]
    tokenizer = Qwen2Tokenizer(*byte_level_vocab(folder, {}), unk_token=None, bos_token=None,
                               eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                                max_image_size={"longest_edge": 32})
    # 32 px in patches of 8 is 4x4, pixel-shuffled by 2: 4 image tokens
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                                                            image_token_id=ids["<image>"],
                                                            pad_token_id=ids["<|endoftext|>"])).eval()
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [ids[t] for t in specials if t != "<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("florence2") / "tiny-florence2")


@pytest.fixture(scope="module")
def captioner(model_folder) -> Captioner:
    return Captioner(str(model_folder), "cpu")


def make_dataset(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (48 + 8 * index, 40), COLOURS[index % len(COLOURS)]).save(folder / f"img{index}.png")
    return folder


def run(folder: Path, options: dict, captioner: Captioner | None = None, should_stop=None) -> list[Event]:
    events: list[Event] = []
    run_job(folder, options, events.append, should_stop, captioner)
    assert sum(event.terminal for event in events) == 1 and events[-1].terminal, events
    return events


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_every_image_gets_a_caption_with_the_prefix_first(tmp_path, model_folder):
    folder = make_dataset(tmp_path / "data")
    events = run(folder, {"model": str(model_folder), "prefix": "  sks   dog ", "batch_size": 2,
                          "max_new_tokens": 6, "device": "cpu"})  # the real from_pretrained path
    started, *progress, complete = events
    assert isinstance(started, CaptionStarted) and started.total == 3 and started.device == "cpu"
    assert [(p.done, p.total, p.file, p.status) for p in progress] == [
        (1, 3, "img0.png", "written"), (2, 3, "img1.png", "written"), (3, 3, "img2.png", "written")]
    assert isinstance(complete, CaptionComplete)
    assert (complete.written, complete.kept, complete.num_refused) == (3, 0, 0)
    for index, event in enumerate(progress):
        text = (folder / f"img{index}.txt").read_text(encoding="utf-8")
        assert text == event.caption and text.startswith("sks dog, ") and len(text) > len("sks dog, ")
    assert not leftovers(folder)


def test_only_images_without_a_caption_are_captioned_unless_overwrite(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data")
    (folder / "img0.txt").write_bytes(b"my own words, kept\n")
    (folder / "img1.txt").write_text("  \n", encoding="utf-8")  # empty: captioned like a missing one
    events = run(folder, {"max_new_tokens": 4, "num_beams": 1}, captioner)
    assert [e.file for e in events if isinstance(e, CaptionProgress)] == ["img1.png", "img2.png"]
    assert (events[0].kept, events[-1].kept, events[-1].written) == (1, 1, 2)
    assert (folder / "img0.txt").read_bytes() == b"my own words, kept\n"
    assert (folder / "img1.txt").read_text(encoding="utf-8").strip()

    events = run(folder, {"max_new_tokens": 4, "num_beams": 1, "overwrite": True, "prefix": "zzq"}, captioner)
    assert events[-1].written == 3 and events[-1].kept == 0
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("zzq, ")


def test_stop_after_the_first_batch_ends_interrupted_with_whole_captions(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data")
    events: list[Event] = []  # Stop is pressed once the first image is reported
    run_job(folder, {"batch_size": 2, "max_new_tokens": 4, "num_beams": 1}, events.append,
            lambda: any(isinstance(event, CaptionProgress) for event in events), captioner)
    assert sum(event.terminal for event in events) == 1
    assert isinstance(events[-1], Interrupted) and events[-1].step == 2 and events[-1].checkpoint_path is None
    assert sorted(path.name for path in folder.glob("*.txt")) == ["img0.txt", "img1.txt"]
    assert not leftovers(folder)


def test_stop_during_generation_drops_the_batch(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data", 2)
    calls = []

    def should_stop() -> bool:  # no at the batch's start, yes from inside generate on
        calls.append(1)
        return len(calls) > 1

    events = run(folder, {"batch_size": 2, "max_new_tokens": 20, "num_beams": 1}, captioner, should_stop)
    assert isinstance(events[-1], Interrupted) and events[-1].step == 0
    assert not list(folder.glob("*.txt")) and not leftovers(folder)


def test_a_link_out_of_the_folder_is_never_written_through(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data", 1)
    outside = make_dataset(tmp_path / "outside", 2)
    (folder / "linked.png").symlink_to(outside / "img0.png")  # an image that lives elsewhere
    (outside / "secret.txt").write_text("not yours", encoding="utf-8")
    Image.new("RGB", (40, 40)).save(folder / "pic.png")
    (folder / "pic.txt").symlink_to(outside / "secret.txt")  # a caption that leads out
    events = run(folder, {"max_new_tokens": 4, "num_beams": 1, "overwrite": True}, captioner)
    complete = events[-1]
    assert isinstance(complete, CaptionComplete) and complete.written == 1
    reasons = {item["file"]: item["reason"] for item in complete.refused}
    assert set(reasons) == {"linked.png", "pic.png"} and "outside the dataset folder" in reasons["linked.png"]
    assert "symbolic link" in reasons["pic.png"]
    assert not (outside / "img0.txt").exists() and (outside / "secret.txt").read_text(encoding="utf-8") == "not yours"
    assert (folder / "pic.txt").is_symlink()


def test_an_unreadable_image_is_refused_with_its_reason_and_the_rest_captioned(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data", 2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    events = run(folder, {"max_new_tokens": 4, "num_beams": 1, "batch_size": 4}, captioner)
    refused = [e for e in events if isinstance(e, CaptionProgress) and e.status == "refused"]
    assert [e.file for e in refused] == ["broken.jpg"] and "not a readable image" in refused[0].caption
    assert events[-1].written == 2 and events[-1].num_refused == 1 and not (folder / "broken.txt").exists()


def test_a_folder_that_is_no_model_is_one_error_naming_the_model(tmp_path):
    folder = make_dataset(tmp_path / "data", 1)
    (tmp_path / "empty-model").mkdir()
    events = run(folder, {"model": str(tmp_path / "empty-model"), "device": "cpu"})
    assert isinstance(events[-1], Error) and events[-1].field == "model" and "empty-model" in events[-1].message
    assert not list(folder.glob("*.txt"))
    assert isinstance(run(tmp_path / "nowhere", {})[-1], Error)
    (tmp_path / "no-images").mkdir()
    assert "no image" in run(tmp_path / "no-images", {})[-1].message


def test_the_command_streams_json_events_and_exits_0(tmp_path, model_folder, capfd):
    from lora_core.__main__ import main

    folder = make_dataset(tmp_path / "data", 2)
    code = main(["caption", str(folder), "--model", str(model_folder), "--prefix", "sks", "--batch-size", "1",
                 "--max-new-tokens", "5", "--num-beams", "2", "--device", "cpu"])
    out = capfd.readouterr().out
    events = [parse_event(line) for line in out.splitlines()]
    assert code == 0 and [e.type for e in events] == ["caption_started", "caption_progress", "caption_progress",
                                                      "caption_complete"]
    assert all((folder / f"img{i}.txt").read_text(encoding="utf-8").startswith("sks, ") for i in range(2))


def test_the_plan_and_the_prefix_need_no_model(tmp_path):
    folder = make_dataset(tmp_path / "data", 2)
    (folder / "img0.txt").write_text("kept", encoding="utf-8")
    (folder / ".lora-studio-exclude").write_text("img1.png\n", encoding="utf-8")
    plan = plan_folder(folder)
    assert (plan.todo, plan.kept) == ([], ["img0.png"])
    assert with_prefix("sks dog", "sks dog, a dog on grass") == "sks dog, a dog on grass"
    assert with_prefix("sks", "  a   photo ") == "sks, a photo" and with_prefix("", "a photo") == "a photo"


def test_blip_captions_without_a_prompt_or_starting_with_it(tmp_path):
    model = build_tiny_blip(tmp_path / "tiny-blip")
    folder = make_dataset(tmp_path / "data", 2)
    events = run(folder, {"model": str(model), "num_beams": 1, "max_new_tokens": 5, "device": "cpu"})
    assert events[-1].written == 2 and all((folder / f"img{i}.txt").read_text(encoding="utf-8") for i in range(2))
    events = run(folder, {"model": str(model), "num_beams": 1, "max_new_tokens": 5, "overwrite": True,
                          "prompt": "a photo of"})
    assert all(e.caption.startswith("a photo of ") for e in events if isinstance(e, CaptionProgress))


def test_a_chat_model_is_asked_through_its_template_and_only_its_answer_is_kept(tmp_path):
    model = build_tiny_idefics3(tmp_path / "tiny-idefics3")
    folder = make_dataset(tmp_path / "data", 3)
    captioner = Captioner(str(model), "cpu", prompt="Say what you see")
    assert captioner.chat and captioner.processor.tokenizer.padding_side == "left"
    events = run(folder, {"num_beams": 1, "max_new_tokens": 3, "batch_size": 3, "prefix": "sks"}, captioner)
    captions = [e.caption for e in events if isinstance(e, CaptionProgress)]
    assert len(captions) == 3 and events[-1].written == 3
    for caption in captions:  # three new tokens of one byte each after the prefix: no prompt, no role names
        assert caption.startswith("sks, ") and len(caption.encode("utf-8")) <= len("sks, ") + 3 * 3
        assert "Say what" not in caption and "Assistant" not in caption


def test_a_batch_the_gpu_has_no_memory_for_is_split_in_halves(tmp_path, captioner, monkeypatch):
    import torch

    folder = make_dataset(tmp_path / "data", 3)
    generate, sizes = captioner.model.generate, []

    def short_of_memory(**inputs):  # the real generation, for batches of one image only
        sizes.append(len(inputs["pixel_values"]))
        if sizes[-1] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(**inputs)

    monkeypatch.setattr(captioner.model, "generate", short_of_memory)
    events = run(folder, {"batch_size": 3, "max_new_tokens": 4, "num_beams": 1}, captioner)
    assert sizes == [3, 1, 2, 1, 1] and events[-1].written == 3


def test_a_full_disk_is_one_error_naming_the_dataset_and_the_captions_written_stay(tmp_path, captioner,
                                                                                    monkeypatch):
    from lora_core import captioner as module
    from lora_core.files import DiskFullError

    folder = make_dataset(tmp_path / "data", 2)
    write = module.atomic_write_text

    def fill_up(path, text):
        if path.name == "img1.txt":
            raise DiskFullError(path)
        return write(path, text)

    monkeypatch.setattr(module, "atomic_write_text", fill_up)
    events = run(folder, {"max_new_tokens": 4, "num_beams": 1}, captioner)
    assert isinstance(events[-1], Error) and events[-1].field == "dataset_path" and "disk is full" in events[-1].message
    assert (folder / "img0.txt").read_text(encoding="utf-8") and not (folder / "img1.txt").exists()


def test_an_option_out_of_range_is_an_error_naming_it(tmp_path, capfd):
    from lora_core.captioner import main

    folder = make_dataset(tmp_path / "data", 1)
    assert main([str(folder), "--batch-size", "0"]) == 1
    (event,) = [parse_event(line) for line in capfd.readouterr().out.splitlines()]
    assert isinstance(event, Error) and event.field == "batch_size"
    assert run(folder, {"colour": "red"})[-1].field == "colour"
    import torch

    if not torch.cuda.is_available():
        error = run(folder, {"device": "cuda"})[-1]
        assert isinstance(error, Error) and error.field == "device" and not list(folder.glob("*.txt"))


def test_the_command_line_of_options_parses_back_to_them():
    from lora_core.captioner import CaptionOptions, command_line, parse_args

    options = CaptionOptions(model="/models/florence", overwrite=True, prefix="-sks dog", max_new_tokens=77,
                             batch_size=2, num_beams=1, prompt="<CAPTION>", device="cpu")
    argv = command_line("/data/dog", options)
    assert argv[:2] == ["caption", "/data/dog"]
    assert parse_args(argv[1:]) == ("/data/dog", options.model_dump())
    assert command_line("/data/dog") == ["caption", "/data/dog"]


@pytest.mark.e2e
def test_a_caption_job_stopped_by_sigterm_ends_interrupted_with_whole_captions(tmp_path, model_folder):
    """The page's path: the command as a job process (launcher.JobProcess), stopped by SIGTERM."""
    import shutil
    import time

    from lora_core.captioner import command_line
    from lora_core.eventlog import read_events
    from studio.launcher import JobProcess, tool_command

    slow = tmp_path / "slow-model"  # the same model, made to say 60 tokens an image
    shutil.copytree(model_folder, slow)
    generation = json.loads((slow / "generation_config.json").read_text(encoding="utf-8"))
    (slow / "generation_config.json").write_text(json.dumps({**generation, "min_new_tokens": 60}), encoding="utf-8")
    folder = make_dataset(tmp_path / "data", 3)
    for index in range(3, 24):
        shutil.copy(folder / "img0.png", folder / f"img{index}.png")
    job = JobProcess.start(tmp_path / "job", tool_command(command_line(
        folder, {"model": str(slow), "batch_size": 1, "num_beams": 1, "max_new_tokens": 60})))
    events_file = tmp_path / "job" / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (events_file.is_file() and "caption_progress" in events_file.read_text()):
        time.sleep(0.05)
    job.terminate()
    assert job.popen.wait(60) == 143
    events = read_events(events_file)
    final = next(event for event in reversed(events) if event.terminal)
    assert isinstance(final, Interrupted) and sum(event.terminal for event in events) == 1
    written = [event.file for event in events if isinstance(event, CaptionProgress)]
    assert 1 <= final.step < 24 and len(written) == final.step
    assert sorted(path.stem for path in folder.glob("*.txt")) == sorted(Path(name).stem for name in written)
    assert not leftovers(folder)


def test_a_caption_written_while_the_model_works_is_kept(tmp_path, captioner):
    folder = make_dataset(tmp_path / "data", 2)

    def editor_saves_meanwhile() -> bool:  # called from inside generation: the caption editor saves img1's
        if not (folder / "img1.txt").exists():
            (folder / "img1.txt").write_text("typed by a person", encoding="utf-8")
        return False

    events = run(folder, {"batch_size": 2, "max_new_tokens": 4, "num_beams": 1}, captioner, editor_saves_meanwhile)
    progress = {e.file: (e.status, e.caption) for e in events if isinstance(e, CaptionProgress)}
    assert progress["img1.png"] == ("kept", "typed by a person") and progress["img0.png"][0] == "written"
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "typed by a person"
    assert (events[-1].written, events[-1].kept) == (1, 1)


@pytest.mark.e2e
def test_the_page_queues_captioning_as_a_job_with_one_final_event_also_when_killed(tmp_path, model_folder):
    """The Captions & doctor tab's button: a job through the page's queue; the editor then shows its captions."""
    from studio.caption_job import CaptionJobPanel
    from studio.captions_editor import CaptionStore
    from studio.jobs import Studio

    studio = Studio(tmp_path / "outputs", devices=0)
    panel = CaptionJobPanel(studio, lambda folder: None)
    try:
        folder = make_dataset(tmp_path / "data", 2)
        (folder / "img1.txt").write_text("my own words", encoding="utf-8")
        status, job_id, answer = panel.start(str(folder), str(model_folder), False, "zwx", 8)
        assert answer["state"] == "running" and job_id
        view = studio.wait(job_id, timeout=180)
        events = read_events(Path(view.output_path) / "events.jsonl")
        assert view.state == "complete" and sum(event.terminal for event in events) == 1, view.message
        assert "Captioning is complete: 1 captions written, 1 kept" in panel.status(job_id)
        store = CaptionStore(folder)
        assert store.text("img0.png").startswith("zwx") and store.text("img1.png") == "my own words"

        _, killed, _ = panel.start(str(folder), str(model_folder), True, "", 8)
        wait_until(lambda: studio._active[killed].process.pid, 60, what="the second caption job's process")
        os.kill(studio._active[killed].process.pid, signal.SIGKILL)
        view = studio.wait(killed, timeout=60)
        events = read_events(Path(view.output_path) / "events.jsonl")
        assert view.state == "failed" and "signal 9" in view.message
        assert sum(event.terminal for event in events) == 1  # the server's, for a job that could give none
    finally:
        studio.shutdown(timeout=10)
