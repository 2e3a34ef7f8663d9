"""The latent cache (--cache_latents) changes nothing but speed: it holds what the live pipeline computes (both flips
of the crops, latents, similarity embeddings, original sizes), a cached run matches the live run and reuses its cache,
and pairs it cannot hold (non-finite latents) are left out."""

import glob

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import SD15, SDXL, cli, losses

import train_diffusion_rpo as rpo


class SingleProcess:
    num_processes, process_index = 1, 0

    def wait_for_everyone(self):
        pass


def test_cache_holds_both_flips_of_the_live_crops(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path):
    args = rpo.parse_args(cli(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, "--cache_latents"))
    models = rpo.load_models(args, torch.device("cpu"), torch.float32)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args), rpo.dataset_columns(args))
    cached = rpo.build_latent_cache(args, SingleProcess(), models, dataset)
    assert len(cached) == len(dataset) and "jpg_0" not in cached.column_names
    tokenizers = {"clip_input_ids": rpo.clip_tokenize_fn(args, models)}
    live = rpo.PreferencePairDataset(dataset, rpo.dataset_columns(args), 32, seed=5, tokenizers=tokenizers)
    from_cache = rpo.PreferencePairDataset(cached, rpo.dataset_columns(args), 32, seed=5)
    keys = [(index, epoch) for index in range(len(dataset)) for epoch in (0, 1)]
    flips = set()
    for key in keys:
        live_item, cached_item = live[key], from_cache[key]
        flips.add(rpo.sample_pair_augmentation(5, *key, False, True)["flip"])
        mean, std = rpo.encode_latent_distribution(models.vae, live_item["pixel_values"], 16)
        torch.testing.assert_close(cached_item["latent_mean"], mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(cached_item["latent_std"], std, rtol=0, atol=1e-6)
        embeddings = rpo.compute_similarity_embeddings(
            models.clip, "text_image", live_item["clip_input_ids"][None], live_item["pixel_values"]
        )
        torch.testing.assert_close(cached_item["embeddings"], embeddings, rtol=0, atol=1e-5)
        assert cached_item["crop_top_left"] == live_item["crop_top_left"]
        assert cached_item["original_size"] == live_item["original_size"]
        assert cached_item["caption"] == live_item["caption"]
    assert flips == {False, True}  # both cached orientations were read


@SD15
def test_cached_run_matches_the_live_run_and_reuses_its_cache(train, tmp_path, monkeypatch):
    live, _ = train("--validation_prompts", output_dir="live")
    cached, args = train(
        "--validation_prompts", "--cache_latents", "--latent_cache_dir", str(tmp_path / "cache"), output_dir="cached"
    )
    # Equal up to float summation order (the cache encodes other batch compositions), amplified by beta = 5000.
    assert losses(cached) == pytest.approx(losses(live), rel=1e-4)
    [cache_file] = glob.glob(str(tmp_path / "cache" / "*.arrow"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached run ran the VAE or the CLIP model")

    # A second run reads the cache: no VAE encode, no CLIP embedding, the same losses.
    monkeypatch.setattr(rpo, "encode_latent_distribution", must_not_run)
    monkeypatch.setattr(rpo, "compute_similarity_embeddings", must_not_run)
    again, _ = train(
        "--validation_prompts", "--cache_latents", "--latent_cache_dir", str(tmp_path / "cache"), output_dir="again"
    )
    assert losses(again) == losses(cached)
    monkeypatch.undo()
    # Anything the cached values depend on (here the resolution) keys a new cache file; the old one is kept.
    train(
        "--validation_prompts",
        "--cache_latents",
        "--latent_cache_dir",
        str(tmp_path / "cache"),
        "--resolution",
        "16",
        output_dir="other",
    )
    assert cache_file in glob.glob(str(tmp_path / "cache" / "*.arrow"))
    assert len(glob.glob(str(tmp_path / "cache" / "*.arrow"))) == 2


@SDXL
def test_sdxl_cached_run_matches_the_live_run(train):
    # The cache must carry what SDXL's time ids are built from (original size, crop of each flip) as well as latents.
    live, _ = train("--validation_prompts", "--max_train_steps", "3", output_dir="live")
    cached, _ = train("--validation_prompts", "--max_train_steps", "3", "--cache_latents", output_dir="cached")
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in live.history], rel=1e-4)


def test_random_crop_with_the_cache_is_refused(capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(["--cache_latents", "--random_crop"])
    assert "--cache_latents stores the centre crop" in capsys.readouterr().err


def test_cached_and_live_original_sizes_agree_for_large_jpegs(sd_pipeline_path, clip_model_path, tmp_path):
    import datasets
    import numpy as np
    import tiny

    rng = np.random.default_rng(3)
    rows = [
        {
            "caption": f"pair {i}",
            "jpg_0": tiny.jpeg_bytes(tiny.random_image(rng, 128, 192)),
            "jpg_1": tiny.jpeg_bytes(tiny.random_image(rng, 128, 192)),
            "label_0": 1.0,
        }
        for i in range(2)
    ]
    path = tiny.write_pickapic_dataset(str(tmp_path / "large"), rows)
    args = rpo.parse_args(cli(sd_pipeline_path, path, clip_model_path, tmp_path, "--cache_latents"))
    models = rpo.load_models(args, torch.device("cpu"), torch.float32)
    dataset, _ = rpo.prepare_preference_dataset(datasets.load_dataset(path, split="train"), rpo.dataset_columns(args))
    cached = rpo.build_latent_cache(args, SingleProcess(), models, dataset)
    live = rpo.PreferencePairDataset(dataset, rpo.dataset_columns(args), 32, seed=5)
    from_cache = rpo.PreferencePairDataset(cached, rpo.dataset_columns(args), 32, seed=5)
    for key in ((0, 0), (1, 0)):
        assert live[key]["original_size"] == from_cache[key]["original_size"] == (128, 192)


def test_pairs_with_nonfinite_latents_are_left_out_of_the_cache(
    sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, monkeypatch
):
    args = rpo.parse_args(cli(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, "--cache_latents"))
    models = rpo.load_models(args, torch.device("cpu"), torch.float32)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args), rpo.dataset_columns(args))
    original = rpo.encode_latent_distribution

    def overflowing(vae, pixels, batch_size):  # the first image of every call overflows, as an fp16 VAE can
        mean, std = original(vae, pixels, batch_size)
        mean[0, 0, 0, 0] = float("nan")
        return mean, std

    monkeypatch.setattr(rpo, "encode_latent_distribution", overflowing)
    cache = rpo.build_latent_cache(args, Accelerator(cpu=True), models, dataset)
    calls = -(-len(dataset) // max(1, args.vae_encode_batch_size // 2))  # one poisoned pair per encoded batch
    assert len(cache) == len(dataset) - calls
    assert all(np.isfinite(np.asarray(row["latent_mean"])).all() for row in cache)
