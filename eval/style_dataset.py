"""Build the paper's style-alignment preference dataset in the Pick-a-Pic schema.

For each prompt (and seed) the rejected image is the base model's generation and the chosen one shows the same content
in the target style, made either
  --method prompt           (default) by the same pipeline and seed with the style appended to the prompt
                            (--style_prompt_template, default "{prompt}, {style}"), or
  --method instruct_pix2pix by an image-editing pipeline (--edit_model, default timbrooks/instruct-pix2pix) applied to
                            the rejected image with --edit_instruction (default "turn it into a {style}").
The caption is the plain prompt, so training teaches the style without asking for it. Which side (jpg_0/jpg_1) holds
the chosen image is drawn per pair from --seed, so position carries no signal. Output: <out>/data/train-00000-of-00001
.parquet (train with --dataset_name <out>), the generated images under <out>/generations/, and style_dataset.json.

    python -m eval.style_dataset --model runwayml/stable-diffusion-v1-5 --prompts prompts.txt \\
        --style "Van Gogh painting" --out data/van-gogh
"""

import argparse
import io
import os

import numpy as np

from eval.generate import (
    call_settings,
    family_of,
    generation_jobs,
    load_pipeline,
    pipeline_class_name,
    prompts_fingerprint,
    resolve_device_and_dtype,
    run_jobs,
)
from eval.image_folder import ImageFolderWriter, image_key, load_image, read_metadata
from eval.prompts import PROMPT_SETS, load_prompts
from eval.report import write_json


METHODS = ("prompt", "instruct_pix2pix")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="Base pipeline (folder or Hub id) that draws the rejected images."
    )
    parser.add_argument("--prompts", required=True, help=f"A named set ({', '.join(PROMPT_SETS)}) or a local file.")
    parser.add_argument("--prompts_source", default=None)
    parser.add_argument("--prompt_column", default=None)
    parser.add_argument("--max_prompts", type=int, default=None)
    parser.add_argument("--style", required=True, help='Target style, e.g. "Van Gogh painting", "pencil sketch".')
    parser.add_argument("--method", choices=METHODS, default="prompt")
    parser.add_argument("--style_prompt_template", default="{prompt}, {style}")
    parser.add_argument("--edit_model", default="timbrooks/instruct-pix2pix")
    parser.add_argument("--edit_instruction", default="turn it into a {style}")
    parser.add_argument("--image_guidance_scale", type=float, default=1.5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if "{prompt}" not in args.style_prompt_template or "{style}" not in args.style_prompt_template:
        parser.error(f"--style_prompt_template {args.style_prompt_template!r} must contain {{prompt}} and {{style}}.")
    if args.method == "instruct_pix2pix" and "{style}" not in args.edit_instruction:
        parser.error(f"--edit_instruction {args.edit_instruction!r} must contain {{style}}.")
    return args


def generation_settings(args, pipeline, records, role, call_kwargs):
    return {
        "role": role,
        "model": args.model if role == "rejected" or args.method == "prompt" else args.edit_model,
        "style": args.style,
        "method": args.method,
        "template": args.style_prompt_template,
        "instruction": args.edit_instruction,
        "num_prompts": len(records),
        "prompts_sha256": prompts_fingerprint(records),
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "pipeline": type(pipeline).__name__,
        **call_kwargs,
    }


def generate_pair_images(args, records, device, dtype):
    """Render the rejected images, then the chosen ones (resumable); returns the two image folders."""
    base = load_pipeline(args.model, device=device, dtype=dtype, disable_safety_checker=True)
    call_kwargs = call_settings(base, args)
    rejected_dir = os.path.join(args.out, "generations", "rejected")
    chosen_dir = os.path.join(args.out, "generations", "chosen")
    jobs = generation_jobs(records, args.images_per_prompt, args.seed)
    writer = ImageFolderWriter(rejected_dir, generation_settings(args, base, records, "rejected", call_kwargs))
    run_jobs(base, jobs, writer, args.batch_size, call_kwargs)
    if args.method == "prompt":
        styled = [
            {
                **job,
                "prompt": args.style_prompt_template.format(prompt=job["prompt"], style=args.style),
                "content_prompt": job["prompt"],
            }
            for job in jobs
        ]
        writer = ImageFolderWriter(chosen_dir, generation_settings(args, base, records, "chosen", call_kwargs))
        run_jobs(base, styled, writer, args.batch_size, call_kwargs)
        return rejected_dir, chosen_dir
    from diffusers import StableDiffusionInstructPix2PixPipeline

    del base
    editor = load_pipeline(
        args.edit_model,
        device=device,
        dtype=dtype,
        disable_safety_checker=True,
        pipeline_class=StableDiffusionInstructPix2PixPipeline,
    )
    edit_kwargs = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else 7.5,
        "image_guidance_scale": args.image_guidance_scale,
    }
    rejected = {image_key(e): e for e in read_metadata(rejected_dir)}
    instruction = args.edit_instruction.format(style=args.style)
    edits = [{**job, "prompt": instruction, "content_prompt": job["prompt"]} for job in jobs]
    writer = ImageFolderWriter(chosen_dir, generation_settings(args, editor, records, "chosen", edit_kwargs))
    run_jobs(
        editor,
        edits,
        writer,
        args.batch_size,
        edit_kwargs,
        batch_inputs=lambda chunk: {"image": [load_image(rejected_dir, rejected[image_key(j)]) for j in chunk]},
    )
    return rejected_dir, chosen_dir


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def preference_rows(rejected_dir, chosen_dir, style, method, seed):
    """Pick-a-Pic v2 rows; the chosen image's side is drawn per pair."""
    rejected = {image_key(e): e for e in read_metadata(rejected_dir)}
    chosen = {image_key(e): e for e in read_metadata(chosen_dir)}
    sides = np.random.default_rng(seed).random(len(rejected)) < 0.5
    rows = []
    for ranking_id, (key, chosen_first) in enumerate(zip(sorted(rejected), sides)):
        caption = rejected[key]["prompt"]
        images = [load_image(chosen_dir, chosen[key]), load_image(rejected_dir, rejected[key])]
        names = [f"style:{method}", "base"]
        if not chosen_first:
            images, names = images[::-1], names[::-1]
        uids = [f"{key[0]}-{key[1]}-{names[0]}", f"{key[0]}-{key[1]}-{names[1]}"]
        rows.append(
            {
                "are_different": True,
                "best_image_uid": uids[0] if chosen_first else uids[1],
                "caption": caption,
                "created_at": "",
                "has_label": True,
                "image_0_uid": uids[0],
                "image_0_url": "",
                "image_1_uid": uids[1],
                "image_1_url": "",
                "jpg_0": png_bytes(images[0]),
                "jpg_1": png_bytes(images[1]),
                "label_0": 1.0 if chosen_first else 0.0,
                "label_1": 0.0 if chosen_first else 1.0,
                "model_0": names[0],
                "model_1": names[1],
                "ranking_id": ranking_id,
                "user_id": 0,
                "num_example_per_prompt": 1,
                "style": style,
                "seed": int(rejected[key]["seed"]),
            }
        )
    return rows


def main(argv=None):
    import datasets

    args = parse_args(argv)
    records = load_prompts(args.prompts, args.prompts_source, args.prompt_column, args.max_prompts)
    family = family_of(pipeline_class_name(args.model))
    device, dtype = resolve_device_and_dtype(args.device, args.mixed_precision, family)
    rejected_dir, chosen_dir = generate_pair_images(args, records, device, dtype)
    rows = preference_rows(rejected_dir, chosen_dir, args.style, args.method, args.seed)
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    path = os.path.join(args.out, "data", "train-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    write_json(
        os.path.join(args.out, "style_dataset.json"),
        {
            "style": args.style,
            "method": args.method,
            "model": args.model,
            "pairs": len(rows),
            "chosen_first": int(sum(r["label_0"] == 1.0 for r in rows)),
            "prompts": args.prompts,
            "template": args.style_prompt_template if args.method == "prompt" else args.edit_instruction,
        },
    )
    print(f"{len(rows)} preference pairs written to {path}; train with --dataset_name {args.out}")
    return path


if __name__ == "__main__":
    main()
