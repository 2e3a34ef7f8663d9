"""online_rpo.py: preference rows from scored groups, rewards, and rounds end to end on the tiny SD1.5 pipeline
(records, budget counts, the reference choice, LoRA, resume between and inside rounds)."""

import math
import os

import numpy as np
import pytest
import torch
from helpers import LN2_FP32, ROOT

import online_rpo


def scored_group(prompt_index, rewards):
    return [
        {"prompt_index": prompt_index, "image_index": k, "prompt": f"p{prompt_index}", "file": f"{k}.png", "reward": r}
        for k, r in enumerate(rewards)
    ]


def test_all_pairs_above_the_margin_each_labelled_by_the_higher_reward():
    rows = online_rpo.preference_rows(scored_group(0, [0.3, 0.9, 0.35, 0.1]), "all", margin=0.1)
    pairs = {(r["file_0"], r["file_1"]): r["label_0"] for r in rows}
    # 6 pairs of 4 samples; 0.3 vs 0.35 is within the margin
    assert pairs == {
        ("0.png", "1.png"): 0.0,
        ("0.png", "3.png"): 1.0,
        ("1.png", "2.png"): 1.0,
        ("1.png", "3.png"): 1.0,
        ("2.png", "3.png"): 1.0,
    }
    assert all(r["label_1"] == 1 - r["label_0"] and r["caption"] == "p0" for r in rows)


def test_best_vs_rest_and_best_vs_worst_pair_the_best_sample():
    group = scored_group(3, [0.2, 0.5, 0.9, 0.4])
    rest = online_rpo.preference_rows(group, "best_vs_rest")
    assert len(rest) == 3 and all("2.png" in (r["file_0"], r["file_1"]) for r in rest)
    assert all((r["label_0"] == 1.0) == (r["file_0"] == "2.png") for r in rest)
    (worst,) = online_rpo.preference_rows(group, "best_vs_worst")
    assert (worst["file_0"], worst["file_1"], worst["label_0"]) == ("0.png", "2.png", 0.0)
    assert online_rpo.preference_rows(scored_group(0, [0.5, 0.5]), "all") == []  # equal rewards: no pair


def test_bradley_terry_labels_follow_the_reward_difference():
    rng = np.random.default_rng(0)
    group = [row for index in range(2000) for row in scored_group(index, [0.25, 0.0])]
    labels = [r["label_0"] for r in online_rpo.preference_rows(group, "all", temperature=0.25, rng=rng)]
    expected = 1 / (1 + math.exp(-1.0))  # sigmoid(0.25 / 0.25)
    assert abs(np.mean(labels) - expected) < 4 * math.sqrt(expected * (1 - expected) / len(labels))


def test_rewards_from_scorers_as_a_weighted_sum_and_from_a_user_function(tmp_path, monkeypatch, scorer_weights):
    from PIL import Image

    from eval.scorers import load_scorer

    (tmp_path / "my_reward.py").write_text(
        "import numpy as np\n"
        "def redness(images, prompts):\n"
        "    return [float(np.asarray(i)[..., 0].mean()) for i in images]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 200))]
    assert online_rpo.load_reward("my_reward:redness")(images, ["a", "b"]) == [200.0, 10.0]
    options = {k: v for k, v in scorer_weights.items() if k.startswith("clip") or k.startswith("aesthetic")}
    weighted = online_rpo.load_reward("clip=2,aesthetic=0.5", options)(images, ["a red square", "a blue square"])
    clip = load_scorer("clip", options).score(images, ["a red square", "a blue square"])
    aesthetic = load_scorer("aesthetic", options).score(images, ["a red square", "a blue square"])
    assert np.allclose(weighted, 2 * np.asarray(clip) + 0.5 * np.asarray(aesthetic))
    with pytest.raises(ValueError, match="cannot import"):
        online_rpo.load_reward("my_reward:missing")


def test_flags_the_loop_sets_are_refused_after_the_separator(capsys):
    base = [
        "--training_script",
        "t.py",
        "--output_dir",
        "o",
        "--prompts",
        "p",
        "--heldout_prompts",
        "h",
        "--reward",
        "r",
    ]
    with pytest.raises(SystemExit):
        online_rpo.parse_args([*base, "--", "--max_train_steps", "5"])
    assert "--max_train_steps after `--` is set by the loop" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Rounds end to end on the tiny SD1.5 pipeline
# ---------------------------------------------------------------------------------------------------------------------

REWARDS = (
    "import numpy as np\n"
    "def brightness(images, prompts):\n"
    "    return [float(np.asarray(i).mean()) / 255 for i in images]\n"
    "def redness(images, prompts):\n"
    "    return [float(np.asarray(i)[..., 0].mean() - np.asarray(i)[..., 2].mean()) / 255 for i in images]\n"
)


@pytest.fixture
def online(sd_pipeline_path, clip_model_path, tmp_path, monkeypatch):
    """online_rpo.main on the tiny SD1.5 pipeline: 3 training prompts, 2 held-out ones, user rewards (brightness to
    train on, redness held out), 3 samples per prompt, 2 steps per round; online(*flags, training=(...))."""
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "train.txt").write_text("a red circle\nblue square on the left\ngreen tree\n")
    (tmp_path / "heldout.txt").write_text("the cat on the house\nred square\n")
    training = ["--pretrained_model_name_or_path", sd_pipeline_path, "--clip_model_name_or_path", clip_model_path]
    training += ["--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]
    training += ["--dataloader_num_workers", "0", "--report_to", "none", "--checkpointing_steps", "1"]

    def run(*flags, training_flags=(), output_dir="online"):
        argv = [
            "--training_script",
            os.path.join(ROOT, "train_diffusion_rpo.py"),
            "--output_dir",
            str(tmp_path / output_dir),
        ]
        argv += ["--prompts", str(tmp_path / "train.txt"), "--heldout_prompts", str(tmp_path / "heldout.txt")]
        argv += ["--reward", "toy_rewards:brightness", "--heldout_reward", "toy_rewards:redness"]
        argv += ["--samples_per_prompt", "3", "--steps_per_round", "2", "--num_inference_steps", "2"]
        argv += ["--heldout_samples_per_prompt", "2", *flags, "--", *training, *training_flags]
        return online_rpo.main(argv)

    return run


def test_rounds_write_records_budgets_plot_card_and_a_pipeline_that_loads(online, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    records = online("--rounds", "2")
    assert [r["round"] for r in records] == [-1, 0, 1]  # the base, then each round
    for r in records[1:]:
        assert r["reward_queries"] == 9  # 3 prompts x 3 samples scored by the training reward
        assert 0 < r["labelled_pairs"] <= 9  # "all" pairs of 3 samples: 3 per prompt
        assert set(r) >= {"heldout_reward", "heldout_heldout_reward", "win_rate_reward", "train_reward_mean"}
    assert records[2]["reward_queries_total"] == 18
    assert records[2]["labelled_pairs_total"] == records[1]["labelled_pairs"] + records[2]["labelled_pairs"]
    out = tmp_path / "online"
    pairs = datasets_load(out / "round-1" / "pairs")
    assert set(pairs.column_names) >= {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "reward_0", "reward_1"}
    assert all(
        (label == 1.0) == (r0 > r1) for label, r0, r1 in zip(pairs["label_0"], pairs["reward_0"], pairs["reward_1"])
    )
    assert isinstance(DiffusionPipeline.from_pretrained(out), StableDiffusionPipeline)
    card = (out / "README.md").read_text()
    assert "2 rounds" in card and "toy_rewards:brightness" in card and "train.txt" in card
    assert (out / "rewards.png").stat().st_size > 0
    assert not list(out.glob("round-*/**/checkpoint-*"))  # a finished round keeps weights, not optimizer states


def datasets_load(path):
    import datasets

    return datasets.load_from_disk(str(path))


def test_reward_ranked_sft_rounds_train_on_the_best_of_k(online, tmp_path):
    records = online("--rounds", "2", "--pairing", "best_vs_worst", training_flags=("--loss_type", "sft"))
    assert [r["round"] for r in records] == [-1, 0, 1] and all(r["labelled_pairs"] <= 3 for r in records[1:])


def test_the_reference_is_the_base_or_the_previous_round(online):
    previous = online("--rounds", "2", "--reference", "previous", output_dir="previous")
    base = online("--rounds", "2", "--reference", "base", output_dir="base")
    # Round 2 starts from round 1's weights: exactly at its reference when that is the previous round, not at the base.
    assert previous[2]["train_first_loss"] == LN2_FP32
    assert base[2]["train_first_loss"] != LN2_FP32
    assert previous[1]["train_first_loss"] == base[1]["train_first_loss"] == LN2_FP32  # round 1: both are the base


def test_a_killed_run_resumes_without_recomputing_what_was_saved(online, tmp_path, monkeypatch):
    online("--rounds", "1")
    scores = tmp_path / "online" / "round-0" / "samples" / "scores.jsonl"
    saved = scores.stat().st_mtime_ns
    # Killed inside round 2's training, after its first checkpoint: the rerun resumes from it.
    original_step, steps = online_rpo.import_training_script(os.path.join(ROOT, "train_diffusion_rpo.py")), []
    training_step = original_step.training_step

    def dies_after_the_first_step(*args, **kwargs):
        if len(steps) == 1:
            raise KeyboardInterrupt
        steps.append(1)
        return training_step(*args, **kwargs)

    monkeypatch.setattr(original_step, "training_step", dies_after_the_first_step)
    with pytest.raises(KeyboardInterrupt):
        online("--rounds", "2")
    assert (tmp_path / "online" / "round-1" / "training" / "checkpoint-1").exists()
    steps.clear()
    monkeypatch.setattr(original_step, "training_step", lambda *a, **k: steps.append(1) or training_step(*a, **k))
    records = online("--rounds", "2")
    assert len(steps) == 1  # only round 2's second step was left
    assert [r["round"] for r in records] == [-1, 0, 1] and scores.stat().st_mtime_ns == saved


def test_lora_rounds_fuse_each_rounds_adapters_into_the_next_rounds_base(online, tmp_path):
    from safetensors.torch import load_file

    records = online("--rounds", "2", training_flags=("--use_lora", "--lora_rank", "4"))
    assert [r["round"] for r in records] == [-1, 0, 1]
    out = tmp_path / "online"
    assert (out / "round-0" / "training" / "pytorch_lora_weights.safetensors").exists()
    unets = [
        load_file(out / f"round-{r}" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors") for r in (0, 1)
    ]
    assert any(not torch.equal(unets[0][k], unets[1][k]) for k in unets[0])  # round 2 trained on round 1's weights
    # Against the base (default): round 1 starts at its reference, round 2 (new adapters on round 1's fused weights) not.
    assert records[1]["train_first_loss"] == LN2_FP32 and records[2]["train_first_loss"] != LN2_FP32


def test_under_a_launcher_every_process_samples_its_share_and_the_images_match_one_process(
    online, tmp_path, monkeypatch
):
    from helpers import free_port, launch_command

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    launcher = launch_command("", processes=2, launch_flags=("--main_process_port", str(free_port())))[:-1]
    records = online("--rounds", "1", "--launcher", " ".join(launcher), output_dir="launched")
    online("--rounds", "1", output_dir="alone")
    assert [r["round"] for r in records] == [-1, 0] and records[1]["reward_queries"] == 9
    samples = tmp_path / "launched" / "round-0" / "samples"
    assert sorted(p.name for p in samples.glob("process-*")) == ["process-0", "process-1"]  # both processes rendered
    launched, single = (
        online_rpo.read_jsonl(str(tmp_path / d / "round-0" / "samples" / "scores.jsonl"))
        for d in ("launched", "alone")
    )
    assert [(r["prompt_index"], r["image_index"], r["seed"]) for r in launched] == [
        (r["prompt_index"], r["image_index"], r["seed"]) for r in single
    ]
    assert np.allclose([r["reward"] for r in launched], [r["reward"] for r in single], atol=2e-3)


def test_the_readme_command_parses_with_a_sane_learning_rate():
    import re
    import shlex

    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("python online_rpo.py")]
    args = online_rpo.parse_args(shlex.split(line)[2:])
    assert (args.reward, args.heldout_reward, args.reference) == ("pickscore", "hpsv2", "base")
    script = online_rpo.import_training_script(os.path.join(ROOT, args.training_script))
    train_args = script.parse_args(args.training_flags)
    low, high = script.SANE_LEARNING_RATES
    assert low <= script.effective_learning_rate(train_args, 8) <= high
    assert re.fullmatch(r"accelerate launch --num_processes \d+", args.launcher)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_rounds_run_on_the_other_families(online, tmp_path, family, request):
    import tiny
    from diffusers import DiffusionPipeline

    script = {"sdxl": "train_diffusion_rpo_sdxl.py", "flux": "train_diffusion_rpo_flux.py"}[family]
    pipeline = request.getfixturevalue(f"{family}_pipeline_path")
    flags = ["--pretrained_model_name_or_path", pipeline]  # the later flag wins over the fixture's SD1.5 base
    flags += ["--max_sequence_length", str(tiny.T5_MAX_TOKENS)] if family == "flux" else []
    records = online("--rounds", "1", "--training_script", os.path.join(ROOT, script), training_flags=flags)
    assert [r["round"] for r in records] == [-1, 0] and records[1]["reward_queries"] == 9
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "online")
    assert type(loaded).__name__ == {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}[family]
