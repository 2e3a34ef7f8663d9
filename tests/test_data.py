"""Pairing, ties, shared augmentation, indexed randomness, image decoding and input checks (method.md, "Randomness")."""

import io
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import tiny
import torch
from helpers import COLUMNS
from PIL import Image

import train_diffusion_rpo as rpo


def load(path):
    return datasets.load_dataset(path, split="train")


def pair_dataset(dataset, **kwargs):
    kwargs = {"resolution": 32, "seed": 0, "random_crop": True, "hflip": True, **kwargs}
    return rpo.PreferencePairDataset(dataset, COLUMNS, **kwargs)


def test_ties_are_dropped_and_counted(pickapic_path):
    dataset, stats = rpo.prepare_preference_dataset(load(pickapic_path), COLUMNS)
    assert stats == {"rows": 18, "ties_dropped": 6, "pairs": 12}
    assert 0.5 not in dataset.unique("label_0")


def test_label_zero_puts_the_second_image_first(pickapic_path):
    dataset, _ = rpo.prepare_preference_dataset(load(pickapic_path), COLUMNS)
    items = pair_dataset(dataset, random_crop=False, hflip=False)
    for index in range(4):
        row = dataset[index]
        expected_winner = row["jpg_0"] if row["label_0"] == 1 else row["jpg_1"]
        expected = rpo.paired_transform([rpo.decode_image(expected_winner)], 32, (0.5, 0.5), False)[0][0]
        assert torch.equal(items[(index, 0)]["pixel_values"][0], expected)
    assert {dataset[i]["label_0"] for i in range(4)} == {0.0, 1.0}


def test_winner_and_loser_share_crop_and_flip():
    # Both images of each pair are the same picture: any difference in crop or flip would show.
    rng = np.random.default_rng(0)
    rows = tiny.pickapic_rows(8, labels=[1, 0] * 4, sizes=((40, 64),))
    for row in rows:
        row["jpg_1"] = row["jpg_0"] = tiny.jpeg_bytes(tiny.random_image(rng, 40, 64))
    dataset = datasets.Dataset.from_list(rows)
    items = pair_dataset(dataset)
    flips, crops = set(), set()
    for index in range(8):
        item = items[(index, 3)]
        assert torch.equal(item["pixel_values"][0], item["pixel_values"][1])
        augmentation = rpo.sample_pair_augmentation(0, index, 3, True, True)
        flips.add(augmentation["flip"])
        crops.add(item["crop_top_left"])
    assert flips == {True, False} and len(crops) > 1  # the draws do vary across pairs


def test_a_loser_of_another_size_gets_the_winner_geometry():
    rng = np.random.default_rng(1)
    winner = Image.fromarray(tiny.random_image(rng, 40, 64))
    loser = Image.fromarray(tiny.random_image(rng, 48, 40))
    augmentation = {"crop_fraction": (0.3, 0.8), "flip": True}
    tensors, sizes, crops = rpo.paired_transform([winner, loser], 32, **augmentation)
    expected, _, _ = rpo.paired_transform(
        [winner, loser.resize(winner.size, Image.Resampling.BICUBIC)], 32, **augmentation
    )
    assert torch.equal(tensors[1], expected[1])  # the loser is cropped where the winner is
    assert sizes == [(40, 64), (40, 64)] and crops[0] == crops[1]  # one set of SDXL time ids fits both


def test_augmentation_and_noise_are_pure_functions_of_the_pair():
    a = rpo.sample_pair_augmentation(7, 12, 2, True, True)
    assert a == rpo.sample_pair_augmentation(7, 12, 2, True, True)
    assert a != rpo.sample_pair_augmentation(7, 12, 3, True, True) or a != rpo.sample_pair_augmentation(
        7, 13, 2, True, True
    )
    n1 = rpo.draw_pair_noise(7, 12, 2, (4, 8, 8), noise_offset=0.1)  # (latent draws of w and l, noise, generator)
    n2 = rpo.draw_pair_noise(7, 12, 2, (4, 8, 8), noise_offset=0.1)
    n3 = rpo.draw_pair_noise(7, 13, 2, (4, 8, 8), noise_offset=0.1)
    assert all(torch.equal(a, b) for a, b in zip(n1[:2], n2[:2]))
    assert torch.equal(torch.rand(3, generator=n1[2]), torch.rand(3, generator=n2[2]))  # the timestep draws too
    assert not torch.equal(n1[1], n3[1])
    assert not torch.equal(n1[0][0], n1[0][1])


def test_loader_output_does_not_depend_on_worker_count(pickapic_path):
    dataset, _ = rpo.prepare_preference_dataset(load(pickapic_path), COLUMNS)
    items = pair_dataset(dataset)

    def batches(workers):
        sampler = rpo.IndexedBatchSampler(len(dataset), 3, seed=5, batches_per_epoch=4)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(
            items, batch_sampler=sampler, collate_fn=rpo.collate_pairs, num_workers=workers
        )
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 4
    for a, b in zip(serial, parallel):
        assert torch.equal(a["pair_index"], b["pair_index"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_left"], b["crop_top_left"])


def test_sampler_shards_a_global_batch_and_resumes_mid_epoch():
    single = rpo.IndexedBatchSampler(20, 4, seed=1, batches_per_epoch=5)
    shards = [
        rpo.IndexedBatchSampler(20, 2, seed=1, batches_per_epoch=5, num_processes=2, process_index=r) for r in range(2)
    ]
    for sampler in [single, *shards]:
        sampler.set_epoch(2)
    for global_batch, *local in zip(single, *shards):
        assert sorted(global_batch) == sorted(local[0] + local[1])
    full = list(single)
    single.set_epoch(2, start_batch=3)
    assert list(single) == full[3:] and len(single) == 2
    single.set_epoch(3)
    assert list(single) != full  # a new order each epoch
    assert all(key[1] == 3 for batch in single for key in batch)


def diffusion_inputs_setup(sd_pipeline_path, pickapic_path, *flags):
    """dpo args, the tiny SD1.5 models and the dataset's pairs, for prepare_diffusion_inputs."""
    args = rpo.parse_args(
        [
            "--pretrained_model_name_or_path",
            sd_pipeline_path,
            "--dataset_name",
            pickapic_path,
            "--resolution",
            "32",
            "--loss_type",
            "dpo",
            "--rpo_weighting",
            "uniform",
            *flags,
        ]
    )
    models = rpo.load_models(args, torch.device("cpu"), torch.float32, args.seed)
    dataset, _ = rpo.prepare_preference_dataset(load(pickapic_path), COLUMNS)
    return args, models, pair_dataset(dataset, tokenizers={"input_ids": rpo.make_tokenize_fn(models.tokenizer)})


def test_pair_noise_does_not_depend_on_batch_composition(sd_pipeline_path, pickapic_path):
    args, models, items = diffusion_inputs_setup(sd_pipeline_path, pickapic_path)
    batch_ab = rpo.collate_pairs([items[(0, 0)], items[(1, 0)]])
    batch_ba = rpo.collate_pairs([items[(1, 0)], items[(0, 0)]])
    inputs_ab = rpo.prepare_diffusion_inputs(args, models, batch_ab, micro_step=0, seed=0)
    inputs_ba = rpo.prepare_diffusion_inputs(args, models, batch_ba, micro_step=0, seed=0)
    order = [1, 0, 3, 2]  # pair 0 is row 0 (winner) and 2 (loser) in ab, rows 1 and 3 in ba
    assert torch.allclose(inputs_ab.noisy_latents, inputs_ba.noisy_latents[order], atol=1e-5)
    assert torch.equal(inputs_ab.timesteps, inputs_ba.timesteps[order])
    assert torch.equal(inputs_ab.target[0], inputs_ab.target[2])  # winner and loser share the noise
    assert torch.equal(inputs_ab.timesteps[0], inputs_ab.timesteps[2])


def test_batch_timestep_sampling_shares_one_t_per_micro_step(sd_pipeline_path, pickapic_path):
    args, models, items = diffusion_inputs_setup(sd_pipeline_path, pickapic_path, "--timestep_sampling", "batch")
    pairs = rpo.collate_pairs([items[(index, 0)] for index in range(3)])
    other_pairs = rpo.collate_pairs([items[(index, 1)] for index in range(3, 6)])

    def inputs(batch, micro_step):
        return rpo.prepare_diffusion_inputs(args, models, batch, micro_step=micro_step, seed=3)

    t = inputs(pairs, 11).timesteps
    assert t.unique().numel() == 1
    assert torch.equal(t, inputs(other_pairs, 11).timesteps)  # whatever the pairs: one t per micro-step
    assert not torch.equal(t, inputs(pairs, 12).timesteps)
    args.timestep_sampling = "pair"
    per_pair = inputs(pairs, 11)
    latent_shape = tuple(per_pair.noisy_latents.shape[1:])
    uniform = torch.stack([torch.rand((), generator=rpo.draw_pair_noise(3, i, 0, latent_shape)[2]) for i in range(3)])
    assert torch.equal(per_pair.timesteps, (uniform * 1000).long().repeat(2))  # the pair's own t, winner and loser


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "LA"])
def test_unusual_image_modes_become_rgb(mode):
    array = (np.arange(16 * 16).reshape(16, 16) % 256).astype(np.uint8)
    if mode == "I;16":
        image = Image.fromarray(array.astype(np.uint16) * 257)
        assert image.mode == "I;16"
    elif mode in ("RGBA", "LA"):
        image = Image.fromarray(np.stack([array] * 4, -1)).convert(mode)
    else:
        image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = rpo.decode_image(buffer.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (16, 16)
    if mode in ("L", "I;16"):
        assert np.array_equal(np.asarray(decoded)[..., 0], array)


def test_large_jpegs_decode_at_reduced_scale_to_nearly_the_same_crop():
    rng = np.random.default_rng(1)
    data = tiny.jpeg_bytes(tiny.random_image(rng, 136, 160))
    reduced, full = rpo.decode_image(data, min_size=32), rpo.decode_image(data)
    assert full.size == (160, 136) and reduced.size == (40, 34)  # 1/4 scale: the smallest that keeps both sides >= 32
    assert rpo.decode_image(data, min_size=80).size == (160, 136)  # half scale would drop below 80: full decode
    crops = [rpo.paired_transform([image], 32, (0.5, 0.5), False)[0][0] for image in (reduced, full)]
    # In [-1, 1] units: 0.004 measured; the same crop mirrored differs by 0.15.
    assert (crops[0] - crops[1]).abs().mean() < 0.02


def test_sdxl_original_size_is_the_files_size_for_jpeg_and_png(tmp_path):
    """SDXL's time ids take the picture's true size: a JPEG decoded at reduced scale and the same picture as PNG give
    the same original_size, live and in the latent cache."""
    array = tiny.random_image(np.random.default_rng(2), 256, 320)
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="PNG")
    for data in (tiny.jpeg_bytes(array), png.getvalue()):
        image = rpo.decode_image(data, min_size=32)
        assert image.info["original_size"] == (320, 256)
        _, sizes, _ = rpo.paired_transform([image, image], 32, (0.5, 0.5), False)
        assert sizes == [(256, 320), (256, 320)]  # (height, width), not the 1/8-scale decode's (32, 40)
    assert rpo.decode_image(tiny.jpeg_bytes(array), min_size=32).size == (40, 32)  # it was decoded reduced


def test_image_feature_and_file_paths_are_read(tmp_path):
    rows = tiny.pickapic_rows(4, labels=[1, 0, 1, 0])
    paths = []
    for i, row in enumerate(rows):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(row["jpg_0"])
        paths.append(str(path))
    dataset = datasets.Dataset.from_dict(
        {
            "caption": [r["caption"] for r in rows],
            "jpg_0": paths,
            "jpg_1": [r["jpg_1"] for r in rows],
            "label_0": [r["label_0"] for r in rows],
        }
    ).cast_column("jpg_0", datasets.Image())
    prepared, _ = rpo.prepare_preference_dataset(dataset, COLUMNS)
    assert prepared.features["jpg_0"].decode is False
    item = pair_dataset(prepared, random_crop=False, hflip=False)[(0, 0)]
    expected = rpo.paired_transform([rpo.decode_image(rows[0]["jpg_0"])], 32, (0.5, 0.5), False)[0][0]
    assert torch.equal(item["pixel_values"][0], expected)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.remove_columns("jpg_1"), r"no column 'jpg_1'.*--image_1_column"),
        (lambda d: d.rename_column("caption", "prompt"), r"no column 'caption'.*--caption_column"),
        (lambda d: d.map(lambda r: {"label_0": 2.0}), r"has the label 2.0; expected 1"),
        (lambda d: d.map(lambda r: {"label_0": 0.5}), r"No preference pairs left"),
        (lambda d: d.cast_column("label_0", datasets.Value("string")), r"must be numeric"),
        (lambda d: d.map(lambda r: {"jpg_0": 3}, features=None), r"images can be decoded.*unsupported image value"),
    ],
)
def test_bad_datasets_are_rejected_clearly(pickapic_path, change, message):
    with pytest.raises(ValueError, match=message):
        rpo.prepare_preference_dataset(change(load(pickapic_path)), COLUMNS)


def test_undecodable_pairs_are_replaced_by_the_next_good_pair_and_counted(caplog):
    rows = tiny.corrupt_rows(tiny.pickapic_rows(6, labels=[1] * 6), [1, 2, 4])  # truncated, zero bytes, not an image
    items = pair_dataset(datasets.Dataset.from_list(rows))
    pairs = [items[(index, 0)] for index in range(6)]
    batch = rpo.collate_pairs(pairs)
    # pair 1 -> row 3 (2 is bad too), 2 -> 3, 4 -> 5: full batch; each replacement keeps its slot's key, so row 3 is
    # trained three times this epoch with three different noises, never twice with the same one
    assert [pair["row_index"] for pair in pairs] == [0, 3, 3, 3, 5, 5]
    assert batch["pair_index"].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["pixel_values"].shape[0] == 12 and int(batch["bad_rows"]) == 4  # 1 and 2, then 2, then 4
    noises = [rpo.draw_pair_noise(0, int(key), 0, (4, 4, 4))[1] for key in batch["pair_index"][1:4]]
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[0], noises[2])
    plain = pair_dataset(datasets.Dataset.from_list(rows), hflip=False, random_crop=False)
    assert torch.equal(plain[(1, 0)]["pixel_values"], plain[(3, 0)]["pixel_values"])  # row 3's images in slot 1
    assert "Pair 1: cannot decode" in caplog.text and "Pair 4: cannot decode" in caplog.text


def test_wrong_image_columns_fail_before_training():
    rows = tiny.pickapic_rows(9, labels=[1] * 9)
    for row in rows:
        row["jpg_0"] = row["jpg_1"] = row["caption"].encode()  # e.g. the caption column passed as an image column
    with pytest.raises(ValueError, match="None of the first 8 pairs' images can be decoded.*--image_0_column"):
        rpo.prepare_preference_dataset(datasets.Dataset.from_list(rows), COLUMNS)


def latent_cache(labels=(1.0, 0.0, 0.5, 1.0, 0.0), embeddings=False):
    """A latent cache as the cache tool writes it: Pick-a-Pic's caption and label beside the cache columns."""
    rows, latent_shape = len(labels), (2, 2, 4, 2, 2)  # (orientations, [winner, loser], channels, height, width)
    latent = datasets.Array5D(latent_shape, "float32")
    features = {
        "caption": datasets.Value("string"),
        "label_0": datasets.Value("float64"),
        rpo.CACHE_LATENT_MEAN: latent,
        rpo.CACHE_LATENT_STD: latent,
        rpo.CACHE_ORIGINAL_SIZE: datasets.Sequence(datasets.Value("int32"), length=2),
        rpo.CACHE_CROP_TOP_LEFT: datasets.Array2D((2, 2), "int32"),
    }
    mean = np.arange(rows * np.prod(latent_shape), dtype=np.float32).reshape(rows, *latent_shape)
    data = {
        "caption": [f"caption {i}" for i in range(rows)],
        "label_0": list(labels),
        rpo.CACHE_LATENT_MEAN: list(mean),
        rpo.CACHE_LATENT_STD: list(mean + 0.5),
        rpo.CACHE_ORIGINAL_SIZE: [[64, 48]] * rows,
        rpo.CACHE_CROP_TOP_LEFT: [[[0, 1], [2, 3]]] * rows,
    }
    if embeddings:
        features[rpo.CACHE_EMBEDDINGS] = datasets.Array3D((2, 2, 3), "float32")
        data[rpo.CACHE_EMBEDDINGS] = list(np.ones((rows, 2, 2, 3), dtype=np.float32))
    return datasets.Dataset.from_dict(data, features=datasets.Features(features)), mean


def test_a_latent_cache_is_read_by_its_columns_instead_of_decoded():
    cache, mean = latent_cache()
    assert rpo.is_latent_cache(cache) and not rpo.is_latent_cache(cache.remove_columns(rpo.CACHE_LATENT_STD))
    prepared, stats = rpo.prepare_preference_dataset(cache, COLUMNS)  # no image columns: nothing to decode
    assert stats == {"rows": 5, "ties_dropped": 1, "pairs": 4}
    items = pair_dataset(prepared, random_crop=False)
    flips = set()
    for index, row in enumerate([0, 1, 3, 4]):
        item = items[(index, 2)]
        flip = rpo.sample_pair_augmentation(0, index, 2, False, True)["flip"]
        flips.add(flip)
        assert torch.equal(item["latent_mean"], torch.from_numpy(mean[row, int(flip)]))
        assert torch.equal(item["latent_std"], torch.from_numpy(mean[row, int(flip)] + 0.5))
        assert item["crop_top_left"] == ((2, 3) if flip else (0, 1)) and item["original_size"] == (64, 48)
    assert flips == {False, True}
    batch = rpo.collate_pairs([items[(index, 0)] for index in range(4)])
    assert batch["latent_mean"].shape == (8, 4, 2, 2) and "pixel_values" not in batch


class FixedTokenizer:
    """Stands in for a text tokenizer: the same 4 ids for every caption."""

    model_max_length = 4

    def __call__(self, caption, **options):
        return SimpleNamespace(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_a_latent_cache_refuses_what_it_cannot_serve():
    """--random_crop, caption dropout under cached text embeddings, and RPO similarity without cached embeddings."""
    models = SimpleNamespace(tokenizer=FixedTokenizer(), clip=None)
    accelerator = SimpleNamespace(num_processes=1, process_index=0)

    def build(*flags, embeddings=False):
        cache, _ = rpo.prepare_preference_dataset(latent_cache(embeddings=embeddings)[0], COLUMNS)
        args = rpo.parse_args(["--dataloader_num_workers", "0", "--train_batch_size", "2", *flags])
        rpo.check_latent_cache(args, cache)  # as the run does once the dataset is prepared, before the models load
        return rpo.build_dataloader(args, accelerator, models, cache, seed=0)

    similarity = ["--loss_type", "rpo", "--rpo_weighting", "similarity", "--proportion_empty_prompts", "0.2"]
    with pytest.raises(ValueError, match="latent cache of the centre crop.*--random_crop"):
        build("--random_crop")
    with pytest.raises(ValueError, match="--proportion_empty_prompts with --similarity_embedding text"):
        build(*similarity, "--similarity_embedding", "text", embeddings=True)
    with pytest.raises(ValueError, match="holds no RPO similarity embeddings"):
        build(*similarity, "--similarity_embedding", "image")
    loader, _ = build(*similarity, "--similarity_embedding", "image", embeddings=True)
    batch = next(iter(loader))
    assert batch["embeddings"].shape == (4, 3) and batch["latent_mean"].shape == (4, 4, 2, 2)
    assert "clip_input_ids" not in batch and batch["input_ids"].shape == (2, 4)
    live = datasets.Dataset.from_list(tiny.pickapic_rows(2, labels=[1, 0]))
    rpo.check_latent_cache(rpo.parse_args(["--random_crop"]), live)  # not a latent cache: nothing to refuse
