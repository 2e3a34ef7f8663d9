"""The latent cache (cache_latents.py) changes nothing but speed: it holds what the live pipeline computes (both flips
of the crops, latents, similarity embeddings, original sizes), a run on it matches the live run without running the
VAE or CLIP, a rebuild reuses or refuses a cache but never mixes two, and pairs it cannot hold (undecodable images,
non-finite latents) are left out and counted against --max_bad_rows."""

import glob
import json
import os
import re
import shlex

import datasets
import numpy as np
import pytest
import torch
from helpers import ROOT, SD15, build_latent_cache, cli, launch, losses

import cache_latents
import train_diffusion_rpo as rpo


SCRIPT = os.path.join(ROOT, "train_diffusion_rpo.py")


def build_cache(*flags):
    """cache_latents.py run in-process for the SD1.5 script; `flags` are the training flags (their --output_dir is the
    cache folder)."""
    return cache_latents.main(["--training_script", SCRIPT, *flags])


def test_cache_holds_both_flips_of_the_live_crops(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path):
    flags = cli(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path / "cache")
    cached = build_cache(*flags)
    args = rpo.parse_args(flags)
    models = rpo.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args.dataset_name), rpo.dataset_columns(args))
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
    with open(tmp_path / "cache" / cache_latents.INFO_FILE) as f:
        info = json.load(f)
    assert info["complete"] and info["pairs"] == 12 and info["ties_dropped"] == 6 and info["pairs_left_out"] == 0
    assert (
        info["training_flags"]["resolution"] == 32 and info["training_flags"]["similarity_embedding"] == "text_image"
    )


@SD15
def test_cached_run_matches_the_live_run_and_reuses_its_cache(train, tmp_path, monkeypatch):
    live, _ = train("--validation_prompts", output_dir="live")
    build_latent_cache(train, "--validation_prompts")
    cache = str(tmp_path / "cache")
    cached, _ = train("--validation_prompts", output_dir="cached", dataset=cache)
    # Equal up to float summation order (the cache encodes other batch compositions), amplified by beta = 5000.
    assert losses(cached) == pytest.approx(losses(live), rel=1e-4)
    cache_files = sorted(glob.glob(os.path.join(cache, "*")))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the VAE or the CLIP model ran on a built cache")

    # Building the same cache again finds it, and a run on the cache encodes nothing: the same losses.
    monkeypatch.setattr(rpo, "encode_latent_distribution", must_not_run)
    monkeypatch.setattr(rpo, "compute_similarity_embeddings", must_not_run)
    assert len(datasets.load_from_disk(build_latent_cache(train, "--validation_prompts"))) == 12
    again, _ = train("--validation_prompts", output_dir="again", dataset=cache)
    assert losses(again) == losses(cached)
    monkeypatch.undo()
    # Anything the cached values depend on (here the resolution) needs another folder; the cache is kept.
    with pytest.raises(ValueError, match="holds a latent cache built from other settings"):
        build_latent_cache(train, "--validation_prompts", "--resolution", "16")
    assert sorted(glob.glob(os.path.join(cache, "*"))) == cache_files
    other = datasets.load_from_disk(
        build_latent_cache(train, "--validation_prompts", "--resolution", "16", output_dir="cache-16")
    )
    latent_sizes = [np.asarray(built[0]["latent_mean"]).shape[-1] for built in (other, datasets.load_from_disk(cache))]
    assert latent_sizes[0] * 2 == latent_sizes[1]  # 16 px and the kept 32 px cache
    with pytest.raises(ValueError, match="is not empty and holds no latent cache"):
        build_latent_cache(train, "--validation_prompts", output_dir="live")


@pytest.mark.parametrize("script", ["sdxl", "sd3", "flux"], indirect=True)
def test_cached_run_matches_the_live_run_of_every_family(train, tmp_path):
    # The cache must carry what SDXL's time ids are built from (original size, crop of each flip) as well as latents;
    # SD3 and FLUX apply their VAE's shift factor to the cached posterior as to a live one.
    live, _ = train("--validation_prompts", "--max_train_steps", "3", output_dir="live")
    build_latent_cache(train, "--validation_prompts")
    cached, _ = train(
        "--validation_prompts", "--max_train_steps", "3", output_dir="cached", dataset=str(tmp_path / "cache")
    )
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in live.history], rel=1e-4)


def test_flags_the_cache_cannot_serve_are_refused(capsys):
    with pytest.raises(SystemExit):
        cache_latents.parse_args(["--training_script", SCRIPT, "--output_dir", "cache", "--random_crop"])
    assert "the cache stores the centre crop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cache_latents.parse_args(
            ["--training_script", SCRIPT, "--output_dir", "c", "--proportion_empty_prompts", "0.2"]
        )
    assert "--similarity_embedding image" in capsys.readouterr().err
    flags = ["--proportion_empty_prompts", "0.2", "--similarity_embedding", "image"]
    cache_latents.parse_args(["--training_script", SCRIPT, "--output_dir", "cache", *flags])


def test_cached_and_live_original_sizes_agree_for_large_jpegs(sd_pipeline_path, clip_model_path, tmp_path):
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
    cached = build_cache(*cli(sd_pipeline_path, path, clip_model_path, tmp_path / "cache"))
    args = rpo.parse_args(cli(sd_pipeline_path, path, clip_model_path, tmp_path))
    dataset, _ = rpo.prepare_preference_dataset(datasets.load_dataset(path, split="train"), rpo.dataset_columns(args))
    live = rpo.PreferencePairDataset(dataset, rpo.dataset_columns(args), 32, seed=5)
    from_cache = rpo.PreferencePairDataset(cached, rpo.dataset_columns(args), 32, seed=5)
    for key in ((0, 0), (1, 0)):
        assert live[key]["original_size"] == from_cache[key]["original_size"] == (128, 192)


def test_pairs_with_nonfinite_latents_are_left_out_and_counted(
    sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, monkeypatch
):
    flags = cli(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path / "cache")
    original = rpo.encode_latent_distribution

    def overflowing(vae, pixels, batch_size):  # the first image of every call overflows, as an fp16 VAE can
        mean, std = original(vae, pixels, batch_size)
        mean[0, 0, 0, 0] = float("nan")
        return mean, std

    monkeypatch.setattr(rpo, "encode_latent_distribution", overflowing)
    batch_size = max(1, rpo.parse_args(flags).vae_encode_batch_size // 2)
    calls = -(-12 // batch_size)  # one poisoned pair per encoded batch of the 12 pairs
    with pytest.raises(RuntimeError, match=f"{calls} pairs could not be decoded while building the latent cache"):
        build_cache(*flags, "--max_bad_rows", str(calls - 1))
    assert not os.path.exists(tmp_path / "cache" / "state.json")  # no cache to train from

    def must_not_run(*args, **kwargs):
        raise AssertionError("the encoded shard was not reused")

    monkeypatch.setattr(rpo, "encode_latent_distribution", must_not_run)  # a rebuild resumes from the encoded shard
    cache = build_cache(*flags, "--max_bad_rows", str(calls))
    assert len(cache) == 12 - calls
    assert all(np.isfinite(np.asarray(row["latent_mean"])).all() for row in cache)


def test_two_processes_build_the_cache_one_process_builds(
    sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, monkeypatch
):
    def flags(output_dir):
        return cli(
            sd_pipeline_path, pickapic_path, clip_model_path, tmp_path / output_dir, "--vae_encode_batch_size", "4"
        )

    # One CPU thread in both builds, as torchrun gives each launched process: convolutions sum in another order on
    # another thread count, so the latents would differ in their last bits.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_cache(*flags("one"))
    finally:
        torch.set_num_threads(threads)
    launch(os.path.join(ROOT, "cache_latents.py"), ["--training_script", SCRIPT, *flags("two")], 2, cwd=tmp_path)
    two = datasets.load_from_disk(str(tmp_path / "two"))
    assert two.features == one.features and len(two) == len(one) == 12
    for name in one.column_names:  # each process encoded its contiguous half, in order
        assert [np.asarray(v).tolist() for v in two[name]] == [np.asarray(v).tolist() for v in one[name]], name


def documented_cache_commands():
    """Every `cache_latents.py` command in README.md and docs/, as its argument list."""
    commands = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "*", "*.md")))]:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            if re.search(r"(launch|python) cache_latents\.py", line):
                tokens = shlex.split(line[line.index("cache_latents.py") :].strip("`"), comments=True)
                commands.append((os.path.relpath(path, ROOT), [t for t in tokens[1:] if t not in ("...", "&")]))
    return commands


def test_documented_cache_commands_parse(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = documented_cache_commands()
    assert commands
    for source, command in commands:
        options, script, args = cache_latents.parse_args(command)
        assert options.output_dir and args.dataset_name, source
