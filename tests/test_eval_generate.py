"""eval.generate and eval.prompts: deterministic seeds, resume, SDXL, SD3 and FLUX, LoRA, prompt sets and their
errors."""

import json
import os

import numpy as np
import pytest
import tiny
from helpers import FAST_GENERATION
from PIL import Image

from eval import generate, prompts
from eval.image_folder import ImageFolderWriter, read_metadata


def run(model, prompt_file, out, *extra):
    return generate.main(["--model", model, "--prompts", prompt_file, "--out", str(out), *FAST_GENERATION, *extra])


# SD3 / FLUX runs: 32 px (FLUX's native size is 128 latents, whatever the VAE), the tiny T5's length.
FLOW_GENERATION = ["--resolution", "32", "--max_sequence_length", str(tiny.T5_MAX_TOKENS)]
FLOW_FAMILIES = pytest.mark.parametrize(
    ("pipeline_fixture", "pipeline_class", "guidance"),
    [("sd3_pipeline_path", "StableDiffusion3Pipeline", 7.0), ("flux_pipeline_path", "FluxPipeline", 3.5)],
)


def pixels(folder):
    return {e["file"]: np.asarray(Image.open(os.path.join(folder, e["file"]))) for e in read_metadata(folder)}


def settings_of(folder):
    with open(os.path.join(folder, "settings.json")) as f:
        return json.load(f)


def differ(first, second):
    """Whether every image of folder `first` differs from the same image in `second` (mean pixel difference > 1)."""
    first, second = pixels(first), pixels(second)
    return first.keys() <= second.keys() and all(
        np.abs(first[k].astype(int) - second[k].astype(int)).mean() > 1 for k in first
    )


def write_lora(model, pipeline_class, layers_key, path, target_modules=("to_q", "to_k", "to_v", "to_out.0")):
    """Random rank-4 LoRA adapters on `target_modules` of the denoiser `model`, saved as the training scripts save
    theirs: pipeline_class.save_lora_weights(path, <layers_key>=...)."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(target_modules)))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    pipeline_class.save_lora_weights(str(path), **{layers_key: layers})
    return str(path)


def test_same_seed_same_image_whatever_the_batch(sd_pipeline_path, prompt_file, tmp_path):
    run(sd_pipeline_path, prompt_file, tmp_path / "b1", "--batch_size", "1", "--images_per_prompt", "2")
    run(sd_pipeline_path, prompt_file, tmp_path / "b3", "--batch_size", "3", "--images_per_prompt", "2")
    one, three = pixels(tmp_path / "b1"), pixels(tmp_path / "b3")
    assert len(one) == 8 and one.keys() == three.keys()
    for name in one:
        assert np.abs(one[name].astype(int) - three[name].astype(int)).max() <= 1
    entries = read_metadata(tmp_path / "b1")
    assert {(e["prompt_index"], e["image_index"], e["seed"]) for e in entries} == {
        (i, k, i + k * generate.SEED_STRIDE) for i in range(4) for k in range(2)
    }
    assert not np.array_equal(one["images/00000_0.png"], one["images/00000_1.png"])  # seeds differ per image


def test_interrupted_run_resumes_where_it_stopped(sd_pipeline_path, prompt_file, tmp_path, monkeypatch):
    run(sd_pipeline_path, prompt_file, tmp_path / "straight", "--batch_size", "2")
    original_add, added = ImageFolderWriter.add, []

    def add_then_crash(self, entry, image):
        if len(added) == 3:
            raise KeyboardInterrupt
        original_add(self, entry, image)
        added.append(entry)

    monkeypatch.setattr(ImageFolderWriter, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(sd_pipeline_path, prompt_file, tmp_path / "resumed", "--batch_size", "2")
    monkeypatch.setattr(ImageFolderWriter, "add", original_add)
    with open(tmp_path / "resumed" / "metadata.jsonl", "a") as f:
        f.write('{"file": "images/000')  # a line torn by the crash
    writer = run(sd_pipeline_path, prompt_file, tmp_path / "resumed", "--batch_size", "2")
    assert len(read_metadata(tmp_path / "resumed")) == 4 == len(writer.done)
    straight, resumed = pixels(tmp_path / "straight"), pixels(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)


def test_resume_with_other_settings_is_refused(sd_pipeline_path, prompt_file, tmp_path):
    run(sd_pipeline_path, prompt_file, tmp_path / "out", "--max_prompts", "1")
    run(sd_pipeline_path, prompt_file, tmp_path / "out", "--max_prompts", "1", "--batch_size", "2")  # runtime only
    with pytest.raises(ValueError, match="guidance_scale: 7.5 -> 3.0"):
        run(sd_pipeline_path, prompt_file, tmp_path / "out", "--max_prompts", "1", "--guidance_scale", "3")


def test_sdxl_pipeline_generates_with_its_own_default_guidance(sdxl_pipeline_path, prompt_file, tmp_path):
    run(sdxl_pipeline_path, prompt_file, tmp_path / "xl", "--max_prompts", "2", "--scheduler", "dpmsolver++")
    settings = settings_of(tmp_path / "xl")
    assert (settings["pipeline"], settings["guidance_scale"], settings["scheduler"]) == (
        "StableDiffusionXLPipeline",
        5.0,
        "DPMSolverMultistepScheduler",
    )
    assert {image.shape for image in pixels(tmp_path / "xl").values()} == {(32, 32, 3)}


@FLOW_FAMILIES
def test_sd3_and_flux_generate_with_their_own_defaults_whatever_the_batch(
    pipeline_fixture, pipeline_class, guidance, request, prompt_file, tmp_path, monkeypatch
):
    import diffusers

    model = request.getfixturevalue(pipeline_fixture)
    load, loads = diffusers.DiffusionPipeline.from_pretrained.__func__, []

    def recording_load(cls, *args, **kwargs):
        loads.append(kwargs)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(recording_load))
    run(model, prompt_file, tmp_path / "b1", *FLOW_GENERATION, "--batch_size", "1", "--disable_safety_checker")
    run(model, prompt_file, tmp_path / "b3", *FLOW_GENERATION, "--batch_size", "3")
    settings = settings_of(tmp_path / "b1")
    assert {key: settings[key] for key in ("pipeline", "scheduler", "guidance_scale", "max_sequence_length")} == {
        "pipeline": pipeline_class,
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "guidance_scale": guidance,
        "max_sequence_length": tiny.T5_MAX_TOKENS,
    }
    # no safety checker to disable: the flag is a no-op, not a keyword the pipeline would warn about
    assert settings["safety_checker"] is False and all("safety_checker" not in kwargs for kwargs in loads)
    one, three = pixels(tmp_path / "b1"), pixels(tmp_path / "b3")
    assert len(one) == 4 and one.keys() == three.keys()
    assert {image.shape for image in one.values()} == {(32, 32, 3)}
    for name in one:
        assert np.abs(one[name].astype(int) - three[name].astype(int)).max() <= 1
    assert "nsfw" not in read_metadata(tmp_path / "b1")[0]
    run(model, prompt_file, tmp_path / "unguided", *FLOW_GENERATION, "--max_prompts", "2", "--guidance_scale", "1")
    assert differ(tmp_path / "unguided", tmp_path / "b1")  # the recorded guidance is the one applied


def test_flow_pipelines_record_their_t5_length_and_others_refuse_it(
    sd_pipeline_path, sd3_pipeline_path, flux_pipeline_path
):
    args = generate.parse_args(["--model", "m", "--prompts", "p", "--out", "o"])
    lengths = [
        generate.call_settings(generate.load_pipeline(path), args)["max_sequence_length"]
        for path in (sd3_pipeline_path, flux_pipeline_path)
    ]
    assert lengths == [256, 512]  # the pipelines' own defaults
    args.max_sequence_length = 77
    with pytest.raises(ValueError, match="Drop --max_sequence_length"):
        generate.call_settings(generate.load_pipeline(sd_pipeline_path), args)


def test_default_dtype_on_cuda_is_bf16_for_sd3_and_flux_only():
    dtypes = {family: generate.resolve_device_and_dtype("cuda", None, family)[1] for family in ("sd", "sd3", "flux")}
    assert {family: str(dtype) for family, dtype in dtypes.items()} == {
        "sd": "torch.float16",
        "sd3": "torch.bfloat16",
        "flux": "torch.bfloat16",
    }
    assert generate.resolve_device_and_dtype("cpu", None, "flux")[1] is generate.torch.float32


def test_flux_schnell_takes_no_guidance(prompt_file, tmp_path):
    schnell = tiny.build_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False)
    run(schnell, prompt_file, tmp_path / "out", *FLOW_GENERATION, "--max_prompts", "1")
    assert settings_of(tmp_path / "out")["guidance_scale"] == 0.0
    with pytest.raises(ValueError, match="no guidance embedding .*Drop --guidance_scale"):
        run(schnell, prompt_file, tmp_path / "guided", *FLOW_GENERATION, "--guidance_scale", "3.5")


@FLOW_FAMILIES
def test_flow_pipelines_refuse_other_schedulers_before_loading(
    pipeline_fixture, pipeline_class, guidance, request, prompt_file, tmp_path, monkeypatch
):
    import diffusers

    model = request.getfixturevalue(pipeline_fixture)

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=f"--scheduler dpmsolver\\+\\+: {pipeline_class} .*Drop --scheduler"):
        run(model, prompt_file, tmp_path / "out", "--scheduler", "dpmsolver++")
    assert not os.path.exists(tmp_path / "out")


def test_lora_adapters_change_the_images(sd_pipeline_path, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_pipeline_path, subfolder="unet")
    lora = write_lora(unet, StableDiffusionPipeline, "unet_lora_layers", tmp_path / "lora")
    run(sd_pipeline_path, prompt_file, tmp_path / "base", "--max_prompts", "2")
    run(sd_pipeline_path, prompt_file, tmp_path / "adapted", "--max_prompts", "2", "--lora", lora)
    assert differ(tmp_path / "base", tmp_path / "adapted")


def test_lora_adapters_on_flux_change_the_images(flux_pipeline_path, prompt_file, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    import train_diffusion_rpo_flux

    transformer = FluxTransformer2DModel.from_pretrained(flux_pipeline_path, subfolder="transformer")
    targets = train_diffusion_rpo_flux.LORA_TARGET_MODULES  # the adapters the FLUX training script trains
    lora = write_lora(transformer, FluxPipeline, "transformer_lora_layers", tmp_path / "lora", targets)
    run(flux_pipeline_path, prompt_file, tmp_path / "base", *FLOW_GENERATION, "--max_prompts", "2")
    run(flux_pipeline_path, prompt_file, tmp_path / "adapted", *FLOW_GENERATION, "--max_prompts", "2", "--lora", lora)
    assert differ(tmp_path / "base", tmp_path / "adapted")
    assert settings_of(tmp_path / "adapted")["lora"] == lora


def test_missing_model_path_is_explained(prompt_file, tmp_path):
    with pytest.raises(ValueError, match="Cannot load a diffusers pipeline"):
        run(str(tmp_path / "nowhere"), prompt_file, tmp_path / "out")


def test_local_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"text": "a cat", "category": "animals"}\n\n{"text": "a dog"}\n')
    (tmp_path / "p.csv").write_text("prompt,category\na cat,animals\n,empty\na dog,animals\n")
    assert prompts.load_prompts(str(tmp_path / "p.jsonl"), column="text") == [
        {"prompt": "a cat", "category": "animals"},
        {"prompt": "a dog", "category": None},
    ]
    assert [r["prompt"] for r in prompts.load_prompts(str(tmp_path / "p.csv"))] == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="--prompt_column"):
        prompts.load_prompts(str(tmp_path / "p.jsonl"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="No prompts"):
        prompts.load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="pickapic_test"):
        prompts.load_prompts("parti")


def test_named_sets_offline_say_how_to_use_a_local_copy():
    with pytest.raises(ValueError, match="--prompts_source"):
        prompts.load_prompts("partiprompts")


def test_named_sets_from_a_local_copy_check_their_size(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"caption": [f"prompt {i}" for i in range(500)]}).to_parquet(
        str(tmp_path / "pickapic" / "data" / "test_unique-00000-of-00001.parquet")
    )
    records = prompts.load_prompts("pickapic_test", source=str(tmp_path / "pickapic"))
    assert len(records) == 500 and records[7]["prompt"] == "prompt 7"
    datasets.Dataset.from_dict({"Prompt": ["x"] * 10, "Category": ["c"] * 10}).to_parquet(
        str(tmp_path / "parti" / "data" / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ValueError, match="has 10 prompts, expected 1632"):
        prompts.load_prompts("partiprompts", source=str(tmp_path / "parti"))


def test_hpsv2_set_reads_the_four_benchmark_files(tmp_path):
    os.makedirs(tmp_path / "benchmark")
    for style in prompts.HPSV2_STYLES:
        (tmp_path / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(800)]))
    records = prompts.load_prompts("hpsv2", source=str(tmp_path))
    assert len(records) == 3200
    assert records[800] == {"prompt": "concept-art 0", "category": "concept-art"}
