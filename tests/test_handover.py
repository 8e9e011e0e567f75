"""The hand-over files of a run: the ComfyUI workflow (checked node by node against ComfyUI's own node
definitions, recorded in tests/data/comfyui_nodes.json) and the reproducibility manifest with `rerun`, whose LoRA
is bit-identical to the original's on the same machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ROOT, make_dataset, run_job_here, tiny_config

from lora_core import comfyui, families, manifest, rerun
from lora_core.families.comfy import ComfySettings

NODES = json.loads((ROOT / "tests" / "data" / "comfyui_nodes.json").read_text(encoding="utf-8"))
WIDGETS = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}


def graph_problems(graph: dict) -> list[str]:
    """What ComfyUI would refuse in an API-format graph: an unknown class, a required input missing or unknown, a
    link to a node or output that does not exist or of another type, a widget value of the wrong kind, no output."""
    problems = []
    for node_id, node in graph.items():
        spec = NODES["nodes"].get(node["class_type"])
        if spec is None:
            problems.append(f"{node_id}: unknown class {node['class_type']}")
            continue
        inputs = node["inputs"]
        for name in spec["inputs"].keys() ^ inputs.keys():
            problems.append(f"{node_id} {node['class_type']}: input {name} "
                            f"{'missing' if name in spec['inputs'] else 'unknown'}")
        for name, kind in spec["inputs"].items():
            if name in inputs:
                problems.extend(f"{node_id} {node['class_type']}.{name}: {p}" for p in _value_problems(
                    graph, inputs[name], kind))
    if not any(NODES["nodes"].get(n["class_type"], {}).get("output_node") for n in graph.values()):
        problems.append("no output node: ComfyUI would run nothing")
    return problems


def _value_problems(graph: dict, value, kind) -> list[str]:
    if isinstance(kind, str) and kind.isupper() and kind not in WIDGETS:  # a link type
        if not (isinstance(value, list) and len(value) == 2 and value[0] in graph):
            return [f"should link to a {kind} output, got {value!r}"]
        outputs = NODES["nodes"][graph[value[0]]["class_type"]]["outputs"]
        if not 0 <= value[1] < len(outputs) or outputs[value[1]] != kind:
            return [f"links to output {value[1]} of node {value[0]}, which is not a {kind}"]
        return []
    if isinstance(kind, list) or kind in ("COMBO:samplers", "COMBO:schedulers"):
        choices = kind if isinstance(kind, list) else NODES[kind.partition(":")[2]]
        return [] if value in choices else [f"{value!r} is not one of ComfyUI's choices"]
    if kind == "COMBO:file":
        return [] if isinstance(value, str) and value.endswith(".safetensors") else [f"{value!r} is no file name"]
    wrong = not isinstance(value, WIDGETS[kind]) or (kind != "BOOLEAN" and isinstance(value, bool))
    return [f"{value!r} is not a {kind}"] if wrong else []


DPM = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
       "timestep_spacing": "leading"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": False}
FLUX_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15}


def settings(**changes) -> ComfySettings:
    base = dict(model_file="base.safetensors", lora_file="lora_final.safetensors", strength=0.8,
                prompts=["a zwx dog", "a zwx cat"], seed=42, steps=20, guidance=3.5, width=512, height=768,
                scheduler=DPM)
    return ComfySettings(**{**base, **changes})


@pytest.mark.parametrize("family, changes, expected", [
    ("sd1", {}, {"CheckpointLoaderSimple", "LoraLoader", "EmptyLatentImage", "KSampler"}),
    ("sd2", {"prediction_type": "v_prediction"}, {"ModelSamplingDiscrete"}),
    ("sdxl", {"zero_terminal_snr": True}, {"ModelSamplingDiscrete"}),
    ("flux", {"scheduler": FLUX_FLOW, "variant": "dev"}, {"UNETLoader", "DualCLIPLoader", "FluxGuidance",
                                                         "ModelSamplingFlux", "EmptySD3LatentImage", "VAELoader"}),
    ("flux", {"scheduler": FLUX_FLOW, "variant": "schnell"}, {"UNETLoader", "ModelSamplingFlux"}),
    ("sd3", {"scheduler": FLOW}, {"TripleCLIPLoader", "ModelSamplingSD3", "EmptySD3LatentImage"}),
    ("sd3", {"scheduler": FLOW, "uses_t5": False}, {"DualCLIPLoader", "ModelSamplingSD3"}),
])
def test_every_family_workflow_uses_comfyui_core_nodes_with_their_inputs_and_links(family, changes, expected):
    graph = families.get(family).comfyui_graph(settings(**changes))
    assert graph_problems(graph) == []
    classes = {node["class_type"] for node in graph.values()}
    assert expected <= classes
    samplers = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
    assert [(s["seed"], s["steps"]) for s in samplers] == [(42, 20), (43, 20)]  # prompt i draws with seed + i
    lora = next(n["inputs"] for n in graph.values() if n["class_type"] == "LoraLoader")
    assert (lora["lora_name"], lora["strength_model"]) == ("lora_final.safetensors", 0.8)
    if "FluxGuidance" in classes or "UNETLoader" in classes:  # FLUX: distilled guidance, no CFG
        assert {s["cfg"] for s in samplers} == {1.0}
        assert ("FluxGuidance" in classes) == (changes["variant"] == "dev")
        shift = next(n["inputs"] for n in graph.values() if n["class_type"] == "ModelSamplingFlux")
        assert (shift["base_shift"], shift["max_shift"], shift["width"], shift["height"]) == (0.5, 1.15, 512, 768)
    else:
        assert {s["cfg"] for s in samplers} == {3.5}


def test_flux_shift_is_the_mu_diffusers_used():
    from lora_core.families.comfy import flux_shifts

    assert flux_shifts(settings(scheduler=FLUX_FLOW)) == (0.5, 1.15)
    static = flux_shifts(settings(scheduler={**FLUX_FLOW, "use_dynamic_shifting": False, "shift": 3.0}))
    assert static[0] == static[1] == pytest.approx(1.0986, abs=1e-4)  # ln 3: shift*t/(1+(shift-1)t)
    other = {**FLUX_FLOW, "base_image_seq_len": 64, "max_image_seq_len": 1024}
    tokens = 512 * 768 / 256
    assert flux_shifts(settings(scheduler=other))[0] == pytest.approx(0.5 + 0.65 * (tokens - 64) / 960)


def test_the_checker_finds_a_broken_link_a_missing_input_and_a_wrong_type():
    graph = families.get("sd1").comfyui_graph(settings())
    sampler = next(n for n in graph.values() if n["class_type"] == "KSampler")
    sampler["inputs"]["positive"] = ["99", 0]
    del sampler["inputs"]["denoise"]
    next(n for n in graph.values() if n["class_type"] == "VAEDecode")["inputs"]["vae"] = ["1", 0]  # MODEL, not VAE
    problems = " | ".join(graph_problems(graph))
    assert "positive" in problems and "denoise missing" in problems and "not a VAE" in problems


def test_scheduler_names_map_to_comfyui_and_say_what_is_not_exact():
    from lora_core.families.comfy import sampler_names

    assert sampler_names(DPM)[:2] == ("dpmpp_2m", "ddim_uniform")  # leading spacing: the nearest
    assert "leading" in sampler_names(DPM)[2]
    assert sampler_names({**DPM, "timestep_spacing": "trailing"})[:2] == ("dpmpp_2m", "sgm_uniform")
    assert sampler_names({**DPM, "use_karras_sigmas": True})[:2] == ("dpmpp_2m", "karras")
    assert sampler_names({**DPM, "algorithm_type": "sde-dpmsolver++"})[:2] == ("dpmpp_2m_sde", "ddim_uniform")
    assert sampler_names(FLOW)[:2] == ("euler", "simple")


def test_model_placeholders_and_the_recommendation(tmp_path):
    assert comfyui.placeholder_name("black-forest-labs/FLUX.1-dev") == "flux1-dev.safetensors"
    assert comfyui.placeholder_name("/models/my model.safetensors") == "my model.safetensors"
    assert comfyui.placeholder_name("builtin:tiny-sd") == "tiny-sd.safetensors"
    assert comfyui.recommendation(tmp_path) == ("lora_final.safetensors", 1.0)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "lora_step_500.safetensors").write_bytes(b"x")
    scores = tmp_path / comfyui.SCORES_FILE
    scores.write_text(json.dumps({"recommended": {"lora": "checkpoints/lora_step_500.safetensors", "strength": 0.7}}))
    assert comfyui.recommendation(tmp_path) == ("checkpoints/lora_step_500.safetensors", 0.7)
    scores.write_text(json.dumps({"recommended": {"lora": "lora_step_500.safetensors", "strength": 0.5}}))
    assert comfyui.recommendation(tmp_path) == ("checkpoints/lora_step_500.safetensors", 0.5)
    scores.write_text(json.dumps({"recommended": {"lora": "../elsewhere.safetensors", "strength": 0.7}}))
    assert comfyui.recommendation(tmp_path) == ("lora_final.safetensors", 1.0)


def test_dataset_folders_come_from_the_configs_path_fields(tmp_path):
    from lora_core.configfile import parse_config

    config = parse_config(tiny_config(tmp_path / "train", tmp_path / "out",
                                      validation_dataset_path=str(tmp_path / "v")))
    assert manifest.dataset_folders(config) == {"dataset_path": str(tmp_path / "train"),
                                                "validation_dataset_path": str(tmp_path / "v")}

    class Later:  # fields other helpers add (concept and regularisation folders), as the config dumps them
        def model_dump(self, mode: str) -> dict:
            return {**config.model_dump(mode=mode), "concepts": [{"path": "c1", "repeats": 2}, {"path": "c2"}],
                    "reg_data_dirs": ["r1"], "cache_dir": "cache"}

    assert set(manifest.dataset_folders(Later())) == {"dataset_path", "validation_dataset_path", "concepts[0].path",
                                                      "concepts[1].path", "reg_data_dirs[0]"}


# ----------------------------------------------------------------------------------------------------
# a trained run, its manifest and workflow, and a rerun


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lora_core.configfile import parse_config

    root = tmp_path_factory.mktemp("handover")
    data = make_dataset(root / "dataset", count=4)
    config = parse_config(tiny_config(data, root / "run", steps=3, checkpoint_steps=100, validation_steps=100,
                                      sample_prompts=["a shapestyle circle"]))
    terminal, _ = run_job_here(config)
    assert terminal.type == "complete"
    return root / "run", data


@pytest.mark.e2e
def test_a_run_leaves_a_complete_manifest_and_a_workflow_that_draws_its_samples(trained):
    run, data = trained
    recorded = manifest.read(run)
    assert recorded["status"] == "complete" and recorded["final_lora"]["tensors_sha256"]
    files = recorded["datasets"]["dataset_path"]["files"]
    assert files["image_0.png"] == manifest.file_sha256(data / "image_0.png") and "image_3.txt" in files
    assert recorded["packages"]["torch"] and recorded["config"]["training_params"]["steps"] == 3
    assert recorded["model"]["family"] == "sd1" and recorded["seeds"]["seed"] == 7
    graph = json.loads((run / comfyui.WORKFLOW_FILE).read_text(encoding="utf-8"))
    assert graph_problems(graph) == []
    sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["sampler_name"]) == (7, 2, "dpmpp_2m")
    prompts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert "a shapestyle circle" in prompts
    # a recommendation from the scoring rewrites it
    (run / comfyui.SCORES_FILE).write_text(json.dumps({"recommended": {"lora": "lora_final.safetensors",
                                                                       "strength": 0.6}}))
    from lora_core.__main__ import main

    assert main(["comfyui", str(run)]) is None  # python -m lora_core comfyui RUN
    graph = json.loads((run / comfyui.WORKFLOW_FILE).read_text(encoding="utf-8"))
    assert next(n["inputs"] for n in graph.values() if n["class_type"] == "LoraLoader")["strength_model"] == 0.6


@pytest.mark.e2e
def test_a_rerun_on_the_same_machine_gives_a_bit_identical_lora(trained, tmp_path):
    from safetensors.torch import load_file

    run, _ = trained
    config, said = rerun.prepare(run, tmp_path / "again")
    assert not [line for line in said if not line.startswith("project commit")]
    terminal, _ = run_job_here(config)
    assert terminal.type == "complete"
    first, second = load_file(run / "lora_final.safetensors"), load_file(tmp_path / "again" / "lora_final.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    assert rerun._compare_result(run, tmp_path / "again") is True  # what the command says after training
    assert manifest.read(tmp_path / "again")["rerun_of"] == {"run": str(run.resolve()), "identical_lora": True}


@pytest.mark.e2e
def test_a_rerun_is_refused_naming_changed_missing_and_new_files_unless_forced(trained, tmp_path, capsys):
    run, data = trained
    copy = shutil.copytree(data, tmp_path / "dataset")
    recorded = manifest.read(run)
    recorded["datasets"]["dataset_path"]["folder"] = str(copy)
    recorded["packages"]["diffusers"] = "0.0.1"
    moved = tmp_path / "run"
    manifest.write(moved, recorded)
    (copy / "image_1.txt").write_text("another caption")
    (copy / "image_2.png").unlink()
    (copy / "extra.png").write_bytes((copy / "image_0.png").read_bytes())
    with pytest.raises(rerun.RerunRefused) as refused:
        rerun.prepare(moved, tmp_path / "again")
    message = str(refused.value)
    assert "changed image_1.txt" in message and "missing image_2.png" in message and "new extra.png" in message
    assert "package diffusers: 0.0.1 then" in message
    assert rerun.main([str(moved), str(tmp_path / "again")]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["type"] == "error"
    config, said = rerun.prepare(moved, tmp_path / "again", force=True)
    assert Path(config.output_path) == tmp_path / "again" and any("image_1.txt" in line for line in said)


@pytest.mark.e2e
def test_the_runs_tab_offers_the_workflow_and_manifest_and_its_rerun_checks_the_dataset(trained, tmp_path):
    from studio.runs_page import RunsTab

    run, data = trained
    files = RunsTab(run.parent).opened(run.name)["files"]
    assert {Path(f).name for f in files} >= {comfyui.WORKFLOW_FILE, manifest.MANIFEST_FILE}
    config = rerun.page_config(run)  # the queue puts it in a fresh folder beside the run
    assert (config.seed, config.steps, Path(config.output_path)) == (7, 3, run)
    moved = tmp_path / "run"
    recorded = manifest.read(run)
    recorded["datasets"]["dataset_path"]["folder"] = str(shutil.copytree(data, tmp_path / "dataset"))
    manifest.write(moved, recorded)
    (tmp_path / "dataset" / "image_0.txt").write_text("changed")
    with pytest.raises(rerun.RerunRefused, match="changed image_0.txt"):
        rerun.page_config(moved)
