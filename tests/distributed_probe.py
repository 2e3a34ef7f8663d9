"""One micro-step of train_diffusion_rpo's own functions, for tests under `accelerate launch` (and in one process).

    python tests/distributed_probe.py OUT.pt <training flags>

Each process saves OUT.pt.rank<r>: its loss, the (global, with --rpo_global_matrix) per-sample model losses the loss
was computed from, its batch's pair indices, and the UNet gradient after DDP's averaging.
"""

import sys

import torch

import train_diffusion_rpo as rpo


def main(argv):
    out, args = argv[0], rpo.parse_args(argv[1:])
    accelerator = rpo.build_accelerator(args)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args), rpo.dataset_columns(args))
    models = rpo.load_models(args, accelerator.device, torch.float32)
    unet = accelerator.prepare(models.unet)
    models.unwrap = accelerator.unwrap_model
    loader, _ = rpo.build_dataloader(args, accelerator, models, dataset, args.seed)
    batch = next(iter(loader))
    seen = {}
    compute_preference_loss = rpo.compute_preference_loss

    def recording(model_losses, ref_losses, **kwargs):
        seen["model_losses"], seen["ref_losses"] = model_losses.detach(), ref_losses.detach()
        return compute_preference_loss(model_losses, ref_losses, **kwargs)

    rpo.compute_preference_loss = recording
    loss, metrics = rpo.compute_step_loss(args, models, unet, batch, 0, args.seed)
    accelerator.backward(loss)
    gradient = torch.cat([p.grad.flatten() for p in accelerator.unwrap_model(unet).parameters()])
    torch.save({"loss": loss.detach(), "gradient": gradient, "pair_index": batch["pair_index"], **seen,
                "processes": accelerator.num_processes}, f"{out}.rank{accelerator.process_index}")
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
