"""Generate evaluation images for a checkpoint (SD1.5, SDXL, SD3/SD3.5 or FLUX.1): deterministic seeds per prompt,
batched, resumable.

    python -m eval.generate --model sd15-rpo --prompts pickapic_test --out samples/sd15-rpo

Image k of prompt i uses seed `--seed + k * 1_000_000 + i` on a CPU generator, so an image does not depend on the batch
size, the GPU or which other prompts are in the run, and two models compared on the same prompts share their noise.
"""

import argparse
import hashlib
import inspect
import json

import torch
from tqdm.auto import tqdm

from eval.image_folder import ImageFolderWriter
from eval.prompts import PROMPT_SETS, load_prompts


SCHEDULERS = {
    "default": None,  # the pipeline's own (PNDM for SD1.5, Euler for SDXL base, FlowMatchEuler for SD3 and FLUX)
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}
# Diffusion-DPO's evaluation: 50 steps, classifier-free guidance 7.5 (SD1.5) and 5.0 (SDXL). SD3: the pipeline's
# classifier-free guidance 7.0. FLUX.1 [dev]: 3.5, the guidance its transformer embeds (FluxPipeline's guidance_scale);
# a FLUX transformer without guidance embedding ([schnell]) takes none, recorded as 0.0.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5}
FLOW_FAMILIES = ("sd3", "flux")  # flow-matching pipelines: their own scheduler, T5 prompts, no safety checker
SEED_STRIDE = 1_000_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub id (SD1.5, SDXL, SD3/SD3.5 or FLUX.1).")
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
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Default 7.5 (SD1.5), 5.0 (SDXL), 7.0 (SD3), 3.5 (FLUX.1 [dev], embedded guidance); "
        "FLUX.1 [schnell] takes none.",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default="default",
        help="SD1.5/SDXL only: SD3 and FLUX keep their flow-matching scheduler.",
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3/FLUX only: T5 tokens per prompt (default: the pipeline's, 256 for SD3, 512 for FLUX).",
    )
    parser.add_argument("--resolution", type=int, default=None, help="Default: the pipeline's native size.")
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Weights dtype; default fp16 on CUDA (bf16 for SD3 and FLUX), fp32 otherwise.",
    )
    parser.add_argument("--device", default=None, help="Default cuda when available.")
    parser.add_argument(
        "--disable_safety_checker",
        action="store_true",
        help="Keep images the SD1.5 safety checker would black out (it flags benign images too, "
        "which lowers every metric); flagged images are marked nsfw in metadata otherwise. "
        "SDXL, SD3 and FLUX pipelines have no safety checker: there it changes nothing.",
    )
    args = parser.parse_args(argv)
    for flag in ("images_per_prompt", "batch_size", "num_inference_steps", "max_sequence_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1.")
    return args


def resolve_device_and_dtype(device=None, mixed_precision=None, family="sd"):
    """Default: fp16 on CUDA (bf16 for SD3 and FLUX, the dtype their model cards use), fp32 otherwise."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if mixed_precision is None:
        cuda_precision = "bf16" if family in FLOW_FAMILIES else "fp16"
        mixed_precision = cuda_precision if device.startswith("cuda") else "no"
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
    """A diffusers pipeline (the class named by the model's model_index.json unless `pipeline_class` is given).
    `disable_safety_checker` changes nothing for pipelines without one (SDXL, SD3, FLUX); a `scheduler` other than
    "default" is refused for the flow-matching ones (SD3, FLUX), before their weights are read."""
    import diffusers

    class_name = pipeline_class.__name__ if pipeline_class is not None else pipeline_class_name(model)
    if family_of(class_name) in FLOW_FAMILIES and SCHEDULERS[scheduler] is not None:
        raise ValueError(
            f"--scheduler {scheduler}: {class_name} samples a flow-matching ODE with its own "
            "FlowMatchEulerDiscreteScheduler; the DDPM-family schedulers do not apply to it. "
            "Drop --scheduler (or pass --scheduler default)."
        )
    kwargs = {"torch_dtype": dtype}
    if vae is not None:
        kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
    if disable_safety_checker and has_safety_checker(getattr(diffusers, class_name, None)):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipeline = (pipeline_class or diffusers.DiffusionPipeline).from_pretrained(model, **kwargs)
    except (OSError, ValueError) as error:
        raise unreadable(model, error) from error
    if lora is not None:
        pipeline.load_lora_weights(lora)
    if SCHEDULERS[scheduler] is not None:
        scheduler_class = getattr(diffusers, SCHEDULERS[scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def unreadable(model, error):
    return ValueError(
        f"Cannot load a diffusers pipeline from {model!r}: {error}. Pass a folder written by "
        "`save_pretrained` (a training run's output dir) or a Hub id you can reach."
    )


def pipeline_class_name(model):
    """The pipeline class named by the model's model_index.json (read without loading any weights)."""
    import diffusers

    try:
        return diffusers.DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise unreadable(model, error) from error


def has_safety_checker(pipeline_class):
    """Whether the pipeline class takes a safety_checker component (SD1.5's do; SDXL's, SD3's and FLUX's do not).
    Unknown classes (community pipelines) are assumed to, as diffusers ignores the keyword where it is not expected."""
    return pipeline_class is None or "safety_checker" in inspect.signature(pipeline_class.__init__).parameters


def family_of(class_name):
    """The family of a diffusers pipeline class name: sd3, flux, sdxl or sd."""
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    return "sdxl" if "XL" in class_name else "sd"


def model_family(pipeline):
    return family_of(type(pipeline).__name__)


def embeds_guidance(pipeline):
    """False for a FLUX transformer without guidance embedding (FLUX.1 [schnell]), which takes no guidance scale."""
    return bool(getattr(pipeline.transformer.config, "guidance_embeds", True))


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
    """The pipeline call's keywords, recorded in settings.json: steps, guidance, size and, for SD3/FLUX, the T5 length
    (the pipeline's default when --max_sequence_length is not given)."""
    family = model_family(pipeline)
    guidance = args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE[family]
    if family == "flux" and not embeds_guidance(pipeline):
        if args.guidance_scale not in (None, 0.0):
            raise ValueError(
                f"--guidance_scale {args.guidance_scale:g}: this FLUX transformer has no guidance embedding "
                "(as FLUX.1 [schnell]), so the pipeline ignores guidance. Drop --guidance_scale."
            )
        guidance = 0.0
    kwargs = {"num_inference_steps": args.num_inference_steps, "guidance_scale": guidance}
    if args.resolution is not None:
        kwargs.update(height=args.resolution, width=args.resolution)
    max_sequence_length = getattr(args, "max_sequence_length", None)
    if family in FLOW_FAMILIES:
        if max_sequence_length is None:
            max_sequence_length = inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default
        kwargs["max_sequence_length"] = max_sequence_length
    elif max_sequence_length is not None:
        raise ValueError(
            f"--max_sequence_length applies to the T5 prompts of SD3 and FLUX; {type(pipeline).__name__} "
            "has none. Drop --max_sequence_length."
        )
    return kwargs


def main(argv=None):
    args = parse_args(argv)
    records = load_prompts(args.prompts, args.prompts_source, args.prompt_column, args.max_prompts)
    family = family_of(pipeline_class_name(args.model))
    device, dtype = resolve_device_and_dtype(args.device, args.mixed_precision, family)
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
