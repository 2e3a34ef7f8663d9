"""FSDP2's compute at theta = reference, for tests under `torch.distributed.run` (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_probe.py PIPELINE OUT

accelerate runs FSDP only on GPUs, so this probe applies what its FSDP2 plugin applies for --mixed_precision bf16
(`fully_shard` of each transformer and ResNet block and of the root, MixedPrecisionPolicy with param_dtype, reduce_dtype
and output_dtype bf16, under bf16 autocast) to the trained UNet, and runs the script's reference beside it. Rank 0
saves the per-sample losses of the sharded UNet, of the script's FSDP reference and of its DDP reference.
"""

import copy
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import train_diffusion_rpo as rpo


def per_sample_losses(unet, inputs):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        noisy, timesteps, hidden, target = inputs
        targets = SimpleNamespace(timesteps=timesteps, target=target, loss_weights=None)
        return rpo.per_sample_denoising_loss(unet, targets, noisy, hidden, {})


def main(pipeline, out):
    dist.init_process_group("gloo")
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    inputs = (
        torch.randn(4, config.in_channels, config.sample_size, config.sample_size, generator=generator),
        torch.tensor([10, 250, 500, 900]),
        torch.randn(4, 16, config.cross_attention_dim, generator=generator).bfloat16(),
        torch.randn(4, config.in_channels, config.sample_size, config.sample_size, generator=generator),
    )
    ddp_reference = rpo.store_as_autocast_computes(copy.deepcopy(unet), torch.bfloat16)
    rpo.sharding_engine = lambda: DistributedType.FSDP
    fsdp_reference = rpo.store_as_autocast_computes(copy.deepcopy(unet), torch.bfloat16)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16)
    for module in unet.modules():
        if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
            fully_shard(module, mp_policy=policy)
    fully_shard(unet, mp_policy=policy)
    results = {
        "sharded": per_sample_losses(unet, inputs),
        "fsdp_reference": per_sample_losses(fsdp_reference, inputs),
        "ddp_reference": per_sample_losses(ddp_reference, inputs),
    }
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
