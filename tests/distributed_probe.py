"""One micro-step of train_diffusion_rpo's own functions, for tests under `accelerate launch` (and in one process).

    python tests/distributed_probe.py OUT.pt <training flags>

Runs the micro-steps of one optimizer step (--gradient_accumulation_steps), without the update. Each process saves
OUT.pt.rank<r>: its loss per micro-step, the (global, with --rpo_global_matrix) per-sample model losses each loss was
computed from, its batches' pair indices, and the accumulated UNet gradient after DDP's averaging.
"""

import sys

import torch

import train_diffusion_rpo as rpo


def main(argv):
    out, args = argv[0], rpo.parse_args(argv[1:])
    accelerator = rpo.build_accelerator(args)
    dataset, _ = rpo.prepare_preference_dataset(rpo.load_raw_dataset(args.dataset_name), rpo.dataset_columns(args))
    models = rpo.load_models(args, accelerator.device, torch.float32, args.seed)
    unet = accelerator.prepare(models.denoiser)
    loader, _ = rpo.build_dataloader(args, accelerator, models, dataset, args.seed)
    seen = {"model_losses": [], "ref_losses": []}
    compute_preference_loss = rpo.compute_preference_loss

    def recording(model_losses, ref_losses, **kwargs):
        seen["model_losses"].append(model_losses.detach())
        seen["ref_losses"].append(ref_losses.detach())
        return compute_preference_loss(model_losses, ref_losses, **kwargs)

    rpo.compute_preference_loss = recording
    losses, pair_indices = [], []
    batches = iter(loader)
    for micro_step in range(args.gradient_accumulation_steps):  # one optimizer step's micro-steps, no update
        batch = next(batches)
        with accelerator.accumulate(unet):
            loss, _ = rpo.compute_step_loss(args, models, unet, batch, micro_step, args.seed)
            accelerator.backward(loss)
        losses.append(loss.detach())
        pair_indices.append(batch["pair_index"])
    gradient = torch.cat([p.grad.flatten() for p in accelerator.unwrap_model(unet).parameters()])
    torch.save(
        {
            "loss": torch.stack(losses),
            "gradient": gradient,
            "pair_index": torch.cat(pair_indices),
            "model_losses": torch.cat(seen["model_losses"]),
            "ref_losses": torch.cat(seen["ref_losses"]),
            "processes": accelerator.num_processes,
        },
        f"{out}.rank{accelerator.process_index}",
    )
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
