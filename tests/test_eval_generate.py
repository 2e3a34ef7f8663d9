"""eval.generate and eval.prompts: deterministic seeds, resume, SDXL and LoRA, prompt sets and their errors."""

import json
import os

import numpy as np
import pytest
from helpers import FAST_GENERATION
from PIL import Image

from eval import generate, prompts
from eval.image_folder import ImageFolderWriter, read_metadata


def run(model, prompt_file, out, *extra):
    return generate.main(["--model", model, "--prompts", prompt_file, "--out", str(out), *FAST_GENERATION, *extra])


def pixels(folder):
    return {e["file"]: np.asarray(Image.open(os.path.join(folder, e["file"]))) for e in read_metadata(folder)}


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
    with open(tmp_path / "xl" / "settings.json") as f:
        settings = json.load(f)
    assert (settings["pipeline"], settings["guidance_scale"], settings["scheduler"]) == (
        "StableDiffusionXLPipeline",
        5.0,
        "DPMSolverMultistepScheduler",
    )
    assert {image.shape for image in pixels(tmp_path / "xl").values()} == {(32, 32, 3)}


def test_lora_adapters_change_the_images(sd_pipeline_path, prompt_file, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_pipeline_path, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    run(sd_pipeline_path, prompt_file, tmp_path / "base", "--max_prompts", "2")
    run(sd_pipeline_path, prompt_file, tmp_path / "adapted", "--max_prompts", "2", "--lora", str(tmp_path / "lora"))
    base, adapted = pixels(tmp_path / "base"), pixels(tmp_path / "adapted")
    assert all(np.abs(base[k].astype(int) - adapted[k].astype(int)).mean() > 1 for k in base)


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
