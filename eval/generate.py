"""Generate evaluation images for a checkpoint: deterministic seeds per prompt, batched, resumable.

    python -m eval.generate --model sd15-rpo --prompts pickapic_test --out samples/sd15-rpo

Image k of prompt i uses seed `--seed + k * 1_000_000 + i` on a CPU generator, so an image does not depend on the batch
size, the GPU or which other prompts are in the run, and two models compared on the same prompts share their noise.
"""

import argparse
import hashlib
import json

import torch
from tqdm.auto import tqdm

from eval.image_folder import ImageFolderWriter
from eval.prompts import PROMPT_SETS, load_prompts


SCHEDULERS = {
    "default": None,  # the scheduler saved with the pipeline (PNDM for SD1.5, Euler for SDXL base)
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}
# Diffusion-DPO's evaluation: 50 steps, classifier-free guidance 7.5 (SD1.5) and 5.0 (SDXL).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
SEED_STRIDE = 1_000_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub id (SD1.5 or SDXL).")
    parser.add_argument("--lora", default=None, help="LoRA weights (folder or Hub id) loaded onto --model.")
    parser.add_argument("--vae", default=None, help="Replacement VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL.")
    parser.add_argument(
        "--prompts", required=True, help=f"A named set ({', '.join(PROMPT_SETS)}) or a local .txt/.jsonl/.csv file."
    )
    parser.add_argument("--prompts_source", default=None, help="Local copy of a named set's Hub dataset.")
    parser.add_argument("--prompt_column", default=None, help="Prompt column of a .jsonl/.csv file (default prompt).")
    parser.add_argument("--max_prompts", type=int, default=None, help="Only the first N prompts.")
    parser.add_argument("--out", required=True, help="Output folder (images/, metadata.jsonl, settings.json).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default 7.5 (SD1.5) or 5.0 (SDXL).")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="default")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the pipeline's native size.")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Weights dtype; default fp16 on CUDA, fp32 otherwise.",
    )
    parser.add_argument("--device", default=None, help="Default cuda when available.")
    parser.add_argument(
        "--disable_safety_checker",
        action="store_true",
        help="Keep images the SD1.5 safety checker would black out (it flags benign images too, "
        "which lowers every metric); flagged images are marked nsfw in metadata otherwise.",
    )
    args = parser.parse_args(argv)
    for flag in ("images_per_prompt", "batch_size", "num_inference_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    return args


def resolve_device_and_dtype(device=None, mixed_precision=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if mixed_precision is None:
        mixed_precision = "fp16" if device.startswith("cuda") else "no"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return device, dtype


def load_pipeline(
    model,
    lora=None,
    vae=None,
    scheduler="default",
    device="cpu",
    dtype=torch.float32,
    disable_safety_checker=False,
    pipeline_class=None,
):
    """A diffusers pipeline (the class named by the model's model_index.json unless `pipeline_class` is given)."""
    import diffusers

    kwargs = {"torch_dtype": dtype}
    if vae is not None:
        kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
    if disable_safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    loader = pipeline_class or diffusers.DiffusionPipeline
    try:
        pipeline = loader.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot load a diffusers pipeline from {model!r}: {error}. Pass a folder written by "
            "`save_pretrained` (a training run's output dir) or a Hub id you can reach."
        ) from error
    if lora is not None:
        pipeline.load_lora_weights(lora)
    if SCHEDULERS[scheduler] is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def model_family(pipeline):
    return "sdxl" if "XL" in type(pipeline).__name__ else "sd"


def image_seed(base_seed, prompt_index, image_index):
    return base_seed + image_index * SEED_STRIDE + prompt_index


def render(pipeline, prompts, seeds, **call_kwargs):
    """Images for `prompts`, image j drawn from a CPU generator seeded with seeds[j] (batch-size independent)."""
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    output = pipeline(prompt=list(prompts), generator=generators, **call_kwargs)
    flags = getattr(output, "nsfw_content_detected", None) or [None] * len(prompts)
    return output.images, flags


def generation_jobs(records, images_per_prompt, base_seed):
    return [
        {
            "prompt_index": i,
            "image_index": k,
            "prompt": record["prompt"],
            "category": record.get("category"),
            "seed": image_seed(base_seed, i, k),
        }
        for i, record in enumerate(records)
        for k in range(images_per_prompt)
    ]


def run_jobs(pipeline, jobs, writer, batch_size, call_kwargs, progress=True, batch_inputs=None):
    """Render every job the writer has not finished, in batches; returns the number rendered now.
    `batch_inputs(chunk)` adds per-batch pipeline inputs (e.g. the images an editing pipeline edits)."""
    pending = [job for job in jobs if (job["prompt_index"], job["image_index"]) not in writer.done]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), disable=not progress, desc="images")
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        extra = batch_inputs(chunk) if batch_inputs is not None else {}
        images, flags = render(
            pipeline, [job["prompt"] for job in chunk], [job["seed"] for job in chunk], **call_kwargs, **extra
        )
        for job, image, flag in zip(chunk, images, flags):
            writer.add({**job, **({"nsfw": bool(flag)} if flag is not None else {})}, image)
        bar.update(len(chunk))
    bar.close()
    return len(pending)


def prompts_fingerprint(records):
    return hashlib.sha256(json.dumps([r["prompt"] for r in records]).encode()).hexdigest()[:16]


def call_settings(pipeline, args):
    family = model_family(pipeline)
    guidance = args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE[family]
    kwargs = {"num_inference_steps": args.num_inference_steps, "guidance_scale": guidance}
    if args.resolution is not None:
        kwargs.update(height=args.resolution, width=args.resolution)
    return kwargs


def main(argv=None):
    args = parse_args(argv)
    records = load_prompts(args.prompts, args.prompts_source, args.prompt_column, args.max_prompts)
    device, dtype = resolve_device_and_dtype(args.device, args.mixed_precision)
    pipeline = load_pipeline(
        args.model, args.lora, args.vae, args.scheduler, device, dtype, args.disable_safety_checker
    )
    call_kwargs = call_settings(pipeline, args)
    settings = {
        "model": args.model,
        "lora": args.lora,
        "vae": args.vae,
        "pipeline": type(pipeline).__name__,
        "scheduler": type(pipeline.scheduler).__name__,
        "prompts": args.prompts,
        "num_prompts": len(records),
        "prompts_sha256": prompts_fingerprint(records),
        "seed": args.seed,
        "images_per_prompt": args.images_per_prompt,
        "dtype": str(dtype).replace("torch.", ""),
        "safety_checker": getattr(pipeline, "safety_checker", None) is not None,
        **call_kwargs,
        "batch_size": args.batch_size,
        "device": device,
    }
    writer = ImageFolderWriter(args.out, settings)
    jobs = generation_jobs(records, args.images_per_prompt, args.seed)
    rendered = run_jobs(pipeline, jobs, writer, args.batch_size, call_kwargs)
    print(f"{rendered} images generated, {len(jobs) - rendered} already present, in {args.out}")
    return writer


if __name__ == "__main__":
    main()
