"""The style-alignment study: the preference dataset (both construction methods, trainable by the script) and the
CLIP zero-shot style evaluation against an independent computation."""

import io
import os

import datasets
import numpy as np
import pytest
import tiny
import torch
from helpers import FAST_GENERATION, SD15, generate_model_and_baseline
from PIL import Image

from eval import generate, style_alignment, style_dataset
from eval.image_folder import load_image, read_metadata


STYLE = "pencil sketch"


def build(model, prompt_file, out, *extra):
    path = style_dataset.main(
        ["--model", model, "--prompts", prompt_file, "--style", STYLE, "--out", str(out), *FAST_GENERATION, *extra]
    )
    return datasets.load_dataset("parquet", data_files=path, split="train")


def decoded(value):
    return np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))


def test_prompt_method_pairs_styled_and_plain_generations(sd_pipeline_path, prompt_file, tmp_path):
    dataset = build(sd_pipeline_path, prompt_file, tmp_path / "style", "--seed", "3")
    assert len(dataset) == 4
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "best_image_uid", "model_0", "model_1"} <= set(
        dataset.column_names
    )
    sides = np.random.default_rng(3).random(4) < 0.5
    assert dataset["label_0"] == [1.0 if first else 0.0 for first in sides]
    rejected_dir = tmp_path / "style" / "generations" / "rejected"
    chosen_dir = tmp_path / "style" / "generations" / "chosen"
    chosen = {e["prompt_index"]: e for e in read_metadata(chosen_dir)}
    for index, row in enumerate(dataset):
        assert chosen[index]["prompt"] == f"{row['caption']}, {STYLE}" and chosen[index]["seed"] == 3 + index
        winner, loser = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1.0 else (row["jpg_1"], row["jpg_0"])
        assert np.array_equal(decoded(winner), np.asarray(load_image(chosen_dir, chosen[index])))
        assert np.array_equal(decoded(loser), np.asarray(load_image(rejected_dir, read_metadata(rejected_dir)[index])))
        assert row["model_0" if row["label_0"] == 1.0 else "model_1"] == "style:prompt"


def test_chosen_image_is_the_base_model_on_the_styled_prompt(sd_pipeline_path, prompt_file, tmp_path):
    build(sd_pipeline_path, prompt_file, tmp_path / "style", "--max_prompts", "1")
    styled = tmp_path / "styled.txt"
    styled.write_text(f"a red circle, {STYLE}\n")
    generate.main(
        ["--model", sd_pipeline_path, "--prompts", str(styled), "--out", str(tmp_path / "direct"), *FAST_GENERATION]
    )
    chosen_dir = tmp_path / "style" / "generations" / "chosen"
    direct = load_image(tmp_path / "direct", read_metadata(tmp_path / "direct")[0])
    assert np.array_equal(np.asarray(direct), np.asarray(load_image(chosen_dir, read_metadata(chosen_dir)[0])))


@SD15
def test_the_training_script_trains_on_the_style_dataset(train, sd_pipeline_path, prompt_file, tmp_path):
    build(sd_pipeline_path, prompt_file, tmp_path / "style")
    progress, _ = train("--train_batch_size", "2", dataset=str(tmp_path / "style"))
    assert progress.global_step == 2
    assert os.path.exists(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")


def test_instruct_pix2pix_method_edits_the_rejected_image(sd_pipeline_path, prompt_file, tmp_path):
    editor = tiny.build_instruct_pix2pix_pipeline(str(tmp_path / "ip2p"))
    dataset = build(
        sd_pipeline_path,
        prompt_file,
        tmp_path / "style",
        "--method",
        "instruct_pix2pix",
        "--edit_model",
        editor,
        "--max_prompts",
        "2",
    )
    chosen = read_metadata(tmp_path / "style" / "generations" / "chosen")
    assert [e["prompt"] for e in chosen] == [f"turn it into a {STYLE}"] * 2
    for row in dataset:
        assert not np.array_equal(decoded(row["jpg_0"]), decoded(row["jpg_1"]))
        assert row["model_0" if row["label_0"] == 1.0 else "model_1"] == "style:instruct_pix2pix"


def test_bad_templates_are_refused(capsys):
    with pytest.raises(SystemExit):
        style_dataset.parse_args(
            [
                "--model",
                "m",
                "--prompts",
                "p",
                "--style",
                "s",
                "--out",
                "o",
                "--style_prompt_template",
                "{prompt} in style",
            ]
        )
    assert "{style}" in capsys.readouterr().err


def test_style_probability_hit_rate_and_content(sd_pipeline_path, prompt_file, clip_model_path, tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    generate_model_and_baseline(sd_pipeline_path, prompt_file, tmp_path, *FAST_GENERATION)
    result = style_alignment.main(
        [
            "--images",
            str(tmp_path / "model"),
            "--baseline",
            str(tmp_path / "baseline"),
            "--style",
            STYLE,
            "--neutral",
            "a photo",
            "--clip_model",
            clip_model_path,
            "--threshold",
            "0.5",
            "--out",
            str(tmp_path / "report"),
            "--device",
            "cpu",
        ]
    )
    model = CLIPModel.from_pretrained(clip_model_path).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_model_path)
    entries = read_metadata(tmp_path / "model")
    pixels = (
        torch.stack(
            [torch.from_numpy(np.asarray(load_image(tmp_path / "model", e))).permute(2, 0, 1) for e in entries]
        ).float()
        / 255.0
    )
    pixels = (pixels - torch.tensor(tiny.CLIP_IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(tiny.CLIP_IMAGE_STD).view(
        1, 3, 1, 1
    )
    ids = tokenizer([STYLE, "a photo"], padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        probabilities = model(input_ids=ids, pixel_values=pixels).logits_per_image.softmax(-1)[:, 0]
    summary = result["summary"]["model"]
    assert summary["style_probability"]["mean"] == pytest.approx(probabilities.mean().item(), abs=1e-5)
    assert summary["style_hit_rate"]["mean"] == pytest.approx((probabilities > 0.5).float().mean().item())
    assert 0 <= summary["clip"]["mean"] <= 100
    assert result["win_rates"]["style_probability"]["n"] == 4
    assert os.path.exists(tmp_path / "report" / "grid.png")
