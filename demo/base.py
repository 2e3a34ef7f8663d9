"""Builds the style world's tiny base: datasets, an autoencoder, a contrastive CLIP, and a UNet trained from random init
by `train_diffusion_rpo.py --loss_type sft`. The result is committed under demo/assets/ with SHA-256 checksums;
`python -m demo.base --out demo/assets` rebuilds it (about 30 minutes on 2 CPU cores).
"""

import argparse
import hashlib
import io
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from demo import world


WORDS = sorted({w for scene in world.all_scenes() for w in scene.caption.split()})
TOKEN_LENGTH = 24
TEXT_HIDDEN = 64
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def learn_bpe_merges(words):
    """BPE training on the world's words until each is one token; CLIP's tokenizer then replays these merges."""
    segmentations = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while any(len(pieces) > 1 for pieces in segmentations.values()):
        counts = {}
        for pieces in segmentations.values():
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda pair: (counts[pair], pair))
        merges.append(best)
        for word, pieces in segmentations.items():
            merged, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    merged.append(pieces[i] + pieces[i + 1])
                    i += 2
                else:
                    merged.append(pieces[i])
                    i += 1
            segmentations[word] = tuple(merged)
    return merges


def write_tokenizer(path):
    """A CLIP BPE tokenizer whose merges spell the world's words (vocab.json + merges.txt, the standard layout)."""
    os.makedirs(path, exist_ok=True)
    letters = sorted({c for w in WORDS for c in w})
    vocab = {}
    for token in letters + [c + "</w>" for c in letters]:
        vocab.setdefault(token, len(vocab))
    merges = learn_bpe_merges(WORDS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": TOKEN_LENGTH, "tokenizer_class": "CLIPTokenizer"}, f)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pickapic_row(caption, image_0, image_1, label_0, index):
    """A row with the Pick-a-Pic v2 columns the scripts read (plus ids); images are PNG bytes."""
    return {
        "caption": caption,
        "jpg_0": png_bytes(image_0),
        "jpg_1": png_bytes(image_1),
        "label_0": float(label_0),
        "label_1": 1.0 - float(label_0),
        "ranking_id": index,
        "image_0_uid": f"{index}-0",
        "image_1_uid": f"{index}-1",
        "has_label": True,
        "are_different": True,
    }


def write_dataset(path, rows):
    import datasets

    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(os.path.join(path, "data", "train-00000-of-00001.parquet"))
    return path


def pretraining_rows(variants_per_scene, seed, empty_caption_fraction=0.1):
    """Plain scenes as winners (SFT trains on winners only); a fraction with an empty caption for guidance."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(variants_per_scene):
        for scene in world.split_scenes()[0]:
            image = world.render(scene, rng)
            caption = "" if rng.random() < empty_caption_fraction else scene.caption
            rows.append(pickapic_row(caption, image, image, 1.0, len(rows)))
    return rows


def preference_rows(style, variants_per_scene, seed):
    """Chosen = the styled rendering, rejected = the same rendering plain, same caption; sides alternate."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(variants_per_scene):
        for scene in world.split_scenes()[0]:
            state = rng.bit_generator.state
            plain = world.render(scene, rng)
            rng.bit_generator.state = state  # the same jitter for both renderings
            styled = world.render(scene, rng, style)
            if len(rows) % 2 == 0:
                rows.append(pickapic_row(scene.caption, styled, plain, 1.0, len(rows)))
            else:
                rows.append(pickapic_row(scene.caption, plain, styled, 0.0, len(rows)))
    return rows


def to_pixels(images):
    """uint8 (H, W, 3) renderings to a [-1, 1] (N, 3, H, W) tensor, as the pipeline and the CLIP take them."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def random_background(rng):
    """Plain (a quarter), the frame (an eighth) or a random member of the texture family."""
    draw = rng.random()
    return None if draw < 0.25 else "frame" if draw < 0.375 else world.random_texture(rng)


def random_world_images(rng, count):
    scenes = world.all_scenes()
    picks = rng.integers(0, len(scenes), size=count)
    images = [world.render(scenes[p], rng, random_background(rng)) for p in picks]
    return [scenes[p] for p in picks], to_pixels(images)


def round_trip(vae, images):
    """uint8 images through the autoencoder (posterior mean) and back to uint8."""
    with torch.no_grad():
        decoded = vae.decode(vae.encode(to_pixels(images)).latent_dist.mode()).sample
    return ((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def round_trip_report(vae, seed, members=200):
    """How well the autoencoder keeps styles: the named styles, and random texture-family members none of which is
    a named style: pixel MSE in [-1, 1] units and the fraction of styled images still detected after the round trip
    (and of plain ones still not detected)."""
    rng = np.random.default_rng(seed)
    scenes = world.all_scenes()
    report = {}
    styles = {name: world.STYLES[name] for name in world.STYLES}
    for index in range(members):
        texture = world.random_texture(rng)
        styles[f"random-{index}"] = world.texture_style(f"random-{index}", texture)
    kept, plain_kept, errors = {}, [], []
    for name, style in styles.items():
        picked = [scenes[i] for i in rng.integers(0, len(scenes), size=4)]
        styled = [world.render(s, rng, style) for s in picked]
        plain = [world.render(s, rng) for s in picked]
        styled_back, plain_back = round_trip(vae, styled), round_trip(vae, plain)
        errors.append(float(np.mean(((styled_back.astype(float) - np.stack(styled)) / 127.5) ** 2)))
        kept[name] = float(np.mean([style.detect(image) for image in styled_back]))
        plain_kept.append(float(np.mean([not style.detect(image) for image in plain_back])))
    report["named_styles_detected_after_round_trip"] = {name: kept[name] for name in world.STYLES}
    random_kept = [value for name, value in kept.items() if name.startswith("random-")]
    report["random_members"] = members
    report["random_members_detected_after_round_trip"] = float(np.mean(random_kept))
    report["plain_not_detected_after_round_trip"] = float(np.mean(plain_kept))
    report["styled_round_trip_mse"] = float(np.mean(errors))
    return report


def train_autoencoder(steps, seed, log):
    """A 2-level AutoencoderKL (32 px -> 16 x 16 x 4 latents) trained to reconstruct scenes on plain, framed and
    random texture-family backgrounds."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        _, images = random_world_images(rng, 16)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  autoencoder step {step}: reconstruction mse {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        _, images = random_world_images(rng, 256)
        latents = vae.encode(images).latent_dist.sample()
        mse = F.mse_loss(vae.decode(latents).sample, images).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, {
        "reconstruction_mse": mse,
        "scaling_factor": float(1.0 / latents.std()),
        "round_trip": round_trip_report(vae, seed + 100),
    }


def clip_config(vocab_size, bos, eos):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": TOKEN_LENGTH,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        projection_dim=64,
    )


def retrieval_accuracy(model, tokenizer, scenes, seed, per_scene=4):
    """Image -> caption top-1 accuracy among all 48 captions, on renderings (plain and styled) of `scenes`."""
    from demo.evaluate import clip_image_inputs, features

    rng = np.random.default_rng(seed)
    all_scenes = world.all_scenes()
    ids = tokenizer(
        [s.caption for s in all_scenes], padding="max_length", max_length=TOKEN_LENGTH, return_tensors="pt"
    ).input_ids
    images = [world.render(s, rng, random_background(rng)) for s in scenes for _ in range(per_scene)]
    truth = [all_scenes.index(s) for s in scenes for _ in range(per_scene)]
    with torch.no_grad():
        text = F.normalize(features(model.get_text_features(input_ids=ids)), dim=-1)
        pixels = clip_image_inputs(to_pixels(images))
        image = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
    predictions = (image @ text.T).argmax(dim=1).tolist()
    return float(np.mean([p == t for p, t in zip(predictions, truth)]))


def train_clip(path, steps, seed, log):
    """A tiny CLIP trained contrastively on (caption, plain or styled rendering) batches of distinct scenes."""
    from transformers import CLIPModel

    from demo.evaluate import CLIP_MEAN, CLIP_STD, clip_image_inputs

    tokenizer = write_tokenizer(path)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    scenes = world.split_scenes()[0]
    ids = tokenizer(
        [s.caption for s in scenes], padding="max_length", max_length=TOKEN_LENGTH, return_tensors="pt"
    ).input_ids
    for step in range(steps):
        images = [world.render(s, rng, random_background(rng)) for s in scenes]
        pixels = clip_image_inputs(to_pixels(images))
        loss = model(input_ids=ids, pixel_values=pixels, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  clip step {step}: contrastive loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": 32, "width": 32},
                "size": {"shortest_edge": 32},
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
            },
            f,
        )
    train, held_out = world.split_scenes()
    return (
        model,
        tokenizer,
        {
            "retrieval_accuracy_train": retrieval_accuracy(model, tokenizer, train, seed + 1),
            "retrieval_accuracy_held_out": retrieval_accuracy(model, tokenizer, held_out, seed + 2),
        },
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def assemble_pipeline(path, vae, clip_path, tokenizer):
    """A StableDiffusionPipeline folder: trained autoencoder, the CLIP's text tower, a random-init UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(clip_path)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("---\nlicense: apache-2.0\n---\n# Style-world base (tiny, procedurally trained)\n")
    return path


def pretrain_unet(pipeline_path, dataset_path, steps, seed, output_dir):
    """`train_diffusion_rpo.py --loss_type sft` on plain scenes, from the random-init UNet."""
    import train_diffusion_rpo as trainer

    args = trainer.parse_args(
        [
            "--pretrained_model_name_or_path",
            pipeline_path,
            "--dataset_name",
            dataset_path,
            "--loss_type",
            "sft",
            "--resolution",
            "32",
            "--no_hflip",
            "--train_batch_size",
            "32",
            "--learning_rate",
            "5e-4",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "100",
            "--max_train_steps",
            str(steps),
            "--adam_weight_decay",
            "0",
            "--checkpointing_steps",
            str(steps + 1),
            "--dataloader_num_workers",
            "0",
            "--validation_prompts",
            "--report_to",
            "none",
            "--seed",
            str(seed),
            "--output_dir",
            output_dir,
            "--mixed_precision",
            "no",
        ]
    )
    return trainer.main(args)


def sha256_tree(path):
    digests = {}
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo/assets")
    parser.add_argument("--autoencoder_steps", type=int, default=1200)
    parser.add_argument("--clip_steps", type=int, default=600)
    parser.add_argument("--unet_steps", type=int, default=1500)
    parser.add_argument("--variants_per_scene", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round_trip_only",
        action="store_true",
        help="Recompute only the autoencoder's round-trip report of an existing build (--out).",
    )
    args = parser.parse_args(argv)
    log = print
    if args.round_trip_only:
        from diffusers import AutoencoderKL

        with open(os.path.join(args.out, "build_report.json")) as f:
            report = json.load(f)
        vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "base"), subfolder="vae").eval()
        report["autoencoder"]["round_trip"] = round_trip_report(vae, args.seed + 100)
        with open(os.path.join(args.out, "build_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        log(json.dumps(report["autoencoder"], indent=2))
        return
    os.makedirs(args.out, exist_ok=True)
    times, report = {}, {}
    start = time.time()
    vae, report["autoencoder"] = train_autoencoder(args.autoencoder_steps, args.seed, log)
    times["autoencoder_s"] = time.time() - start
    start = time.time()
    clip_path = os.path.join(args.out, "clip")
    _, tokenizer, report["clip"] = train_clip(clip_path, args.clip_steps, args.seed, log)
    times["clip_s"] = time.time() - start
    log(f"CLIP retrieval accuracy: {report['clip']}")
    work = os.path.join(args.out, "_work")
    random_base = assemble_pipeline(os.path.join(work, "random-unet"), vae, clip_path, tokenizer)
    dataset = write_dataset(os.path.join(work, "pretrain"), pretraining_rows(args.variants_per_scene, args.seed))
    start = time.time()
    base_path = os.path.join(args.out, "base")
    pretrain_unet(random_base, dataset, args.unet_steps, args.seed, base_path)
    times["unet_s"] = time.time() - start
    for name in ("logs", "README.md", "validation_grid.png"):
        target = os.path.join(base_path, name)
        if os.path.isdir(target):
            import shutil

            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    with open(os.path.join(base_path, "README.md"), "w") as f:
        f.write("---\nlicense: apache-2.0\n---\n# Style-world base (tiny, procedurally trained by demo/base.py)\n")
    report["times"] = times
    report["args"] = vars(args)
    with open(os.path.join(args.out, "build_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    checksums = {"base": sha256_tree(base_path), "clip": sha256_tree(clip_path)}
    with open(os.path.join(args.out, "CHECKSUMS.json"), "w") as f:
        json.dump(checksums, f, indent=2)
    log(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
