"""The recipe flags users bring from DiffusionDPO and the diffusers examples: caption dropout for classifier-free
guidance, an EMA of the trained weights, and the reward of the validation images logged during training."""

import numpy as np
import pytest
import torch
from helpers import COLUMNS, unet_weights
from PIL import Image
from safetensors.torch import load_file

import train_diffusion_rpo as rpo


# ---------------------------------------------------------------------------------------------------------------------
# --proportion_empty_prompts
# ---------------------------------------------------------------------------------------------------------------------


def test_caption_dropout_rate_matches_the_flag_within_binomial_error():
    keys = [(index, epoch) for index in range(2000) for epoch in range(2)]
    for proportion in (0.2, 0.5):
        dropped = [rpo.caption_dropped(0, index, epoch, proportion) for index, epoch in keys]
        sigma = (proportion * (1 - proportion) / len(keys)) ** 0.5
        assert abs(np.mean(dropped) - proportion) < 4 * sigma
    assert not any(rpo.caption_dropped(0, index, epoch, 0.0) for index, epoch in keys[:100])
    # Indexed draws: the same keys give the same captions in any run or resume; another epoch redraws them.
    first = [rpo.caption_dropped(3, index, 0, 0.5) for index in range(200)]
    assert first == [rpo.caption_dropped(3, index, 0, 0.5) for index in range(200)]
    assert first != [rpo.caption_dropped(3, index, 1, 0.5) for index in range(200)]


def test_a_dropped_caption_is_empty_for_both_images_and_every_encoder(train, script, tmp_path):
    args = train.parse("--proportion_empty_prompts", "0.5", output_dir=tmp_path)
    models = script.module.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args.dataset_name), COLUMNS)
    tokenizers = {
        "input_ids": rpo.make_tokenize_fn(models.tokenizer),
        "clip_input_ids": rpo.clip_tokenize_fn(args, models),
    }
    if models.tokenizer_2 is not None:  # SDXL
        tokenizers["input_ids_2"] = rpo.make_tokenize_fn(models.tokenizer_2)
    items = rpo.PreferencePairDataset(
        dataset, COLUMNS, 32, seed=0, tokenizers=tokenizers, proportion_empty_prompts=0.5
    )
    keys = [(index, 0) for index in range(len(dataset))]
    dropped = [key for key in keys if rpo.caption_dropped(0, *key, 0.5)]
    assert 0 < len(dropped) < len(keys)
    batch = rpo.collate_pairs([items[key] for key in keys])
    for row, key in enumerate(keys):
        empty = key in dropped
        assert (batch["captions"][row] == "") == empty
        for name, tokenize in tokenizers.items():  # text encoder(s) and the RPO similarity CLIP see the same caption
            assert torch.equal(batch[name][row], tokenize("")) == empty
    inputs = script.module.prepare_diffusion_inputs(args, models, batch, 0, 0)
    hidden, pairs = inputs.encoder_hidden_states, len(keys)
    assert torch.equal(hidden[:pairs], hidden[pairs:])  # winner and loser share the (possibly empty) caption


def test_caption_dropout_resumes_exactly(train, tmp_path):
    flags = ("--validation_prompts", "--proportion_empty_prompts", "0.5", "--train_batch_size", "4")
    straight, _ = train("--max_train_steps", "4", "--checkpointing_steps", "100", *flags, output_dir="straight")
    train("--max_train_steps", "2", "--checkpointing_steps", "2", *flags, output_dir="split")
    resumed, _ = train("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *flags, output_dir="split")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# --use_ema
# ---------------------------------------------------------------------------------------------------------------------


def test_saved_weights_are_an_independent_ema_of_the_trained_trajectory(train, script, tmp_path, monkeypatch):
    trajectory, original = [], script.module.update_ema

    def recording(ema, unet, device, offload):
        trajectory.append({name: p.detach().clone() for name, p in unet.named_parameters()})
        original(ema, unet, device, offload)

    monkeypatch.setattr(script.module, "update_ema", recording)
    decay = 0.25  # caps diffusers' warm-up (1 + t) / (10 + t) from the 3rd update on
    train(
        "--validation_prompts",
        "--use_ema",
        "--ema_decay",
        str(decay),
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "4",
    )
    assert len(trajectory) == 4
    expected = dict(trajectory[0])  # update 1: decay 0, the EMA is the weights
    for update, weights in enumerate(trajectory[1:], start=1):
        factor = min(decay, (1 + update) / (10 + update))
        expected = {name: factor * expected[name] + (1 - factor) * weights[name] for name in weights}
    saved = unet_weights(tmp_path / "out")
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(saved[name], trajectory[-1][name]) for name in saved)  # not the live weights
    ema_checkpoint = load_file(tmp_path / "out" / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_checkpoint[name], saved[name]) for name in saved)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "the saved UNet holds the EMA weights" in card


def test_ema_resumes_exactly(train, tmp_path):
    flags = ("--validation_prompts", "--use_ema", "--ema_decay", "0.5", "--train_batch_size", "4")
    train("--max_train_steps", "4", "--checkpointing_steps", "100", *flags, output_dir="straight")
    train("--max_train_steps", "2", "--checkpointing_steps", "2", *flags, output_dir="split")
    train("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *flags, output_dir="split")
    a, b = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--use_ema", "--use_lora"], "--use_lora trains adapters"),
        (["--offload_ema"], "pass --use_ema too"),
        (["--use_ema", "--ema_decay", "1.5"], "argument --ema_decay: 1.5 is out of range: it must be at least 0 and"),
    ],
)
def test_contradictory_ema_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(flags)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# --validation_scorer
# ---------------------------------------------------------------------------------------------------------------------


def test_logged_validation_reward_is_pickscore_of_the_saved_images(train, clip_model_path, scorer_weights, tmp_path):
    from eval.scorers import PickScore

    prompts = ["a red circle", "a blue square on the left"]
    out = tmp_path / "out"
    progress, _ = train(
        "--validation_scorer",
        "pickscore",
        "--validation_scorer_model",
        clip_model_path,
        "--validation_scorer_processor",
        clip_model_path,
        "--validation_steps",
        "1",
        "--validation_prompts",
        *prompts,
        output_dir=out,
    )
    assert [r["step"] for r in progress.validation_rewards] == [1, 2, 2]  # every step, then the final validation
    grid = Image.open(out / "validation_grid.png")  # top row: the reference; bottom row: the trained model
    cells = [[grid.crop((col * 32, row * 32, col * 32 + 32, row * 32 + 32)) for col in range(2)] for row in range(2)]
    scorer = PickScore(scorer_weights, torch.device("cpu"), torch.float32)
    final = progress.validation_rewards[-1]
    assert final["validation_reward"] == pytest.approx(np.mean(scorer.score(cells[1], prompts)), abs=1e-4)
    assert final["validation_reward_reference"] == pytest.approx(np.mean(scorer.score(cells[0], prompts)), abs=1e-4)
    assert final["validation_reward"] != final["validation_reward_reference"]  # the model moved
    assert (
        f"{final['validation_reward']:.4f} (base: {final['validation_reward_reference']:.4f})"
        in (out / "README.md").read_text()
    )
