"""Real multi-process runs (`accelerate launch --num_processes 2`, gloo on CPU): RPO's global contrast matrix, the
indexed randomness across processes, and a 2-process training run that checkpoints, resumes and loads."""

import json
import os
import subprocess

import pytest
import tiny
import torch
from helpers import ROOT, cli, free_port, launch, launch_command, render


PROBE = os.path.join(ROOT, "tests", "distributed_probe.py")


@pytest.fixture(scope="module")
def probes(sd_pipeline_path, pickapic_path, clip_model_path, tmp_path_factory):
    """One step of the same global batch of 4 pairs: 1 process x 4 pairs, 2 processes x 2 pairs with and without
    --rpo_global_matrix."""
    folder = tmp_path_factory.mktemp("probes")

    def probe(name, processes, *extra):
        flags = cli(
            sd_pipeline_path,
            pickapic_path,
            clip_model_path,
            folder / name,
            "--validation_prompts",
            "--train_batch_size",
            str(4 // processes),
            *extra,
        )
        launch(PROBE, [str(folder / name), *flags], processes, folder)
        return [torch.load(f"{folder / name}.rank{rank}", weights_only=True) for rank in range(processes)]

    accumulate = ["--gradient_accumulation_steps", "2", "--timestep_sampling", "batch"]
    return {
        "single": probe("single", 1, "--rpo_global_matrix"),
        "global": probe("global", 2, "--rpo_global_matrix"),
        "local": probe("local", 2),
        "single_accumulated": probe("single_accumulated", 1, "--rpo_global_matrix", *accumulate),
        "global_accumulated": probe("global_accumulated", 2, "--rpo_global_matrix", *accumulate),
    }


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_two_processes_draw_what_one_process_draws_for_the_same_global_batch(probes):
    single, processes = probes["single"][0], probes["global"]
    assert torch.equal(torch.cat([p["pair_index"] for p in processes]), single["pair_index"])
    # The gathered per-sample losses: same pairs, same noise, same timesteps, same latent draws, in the same order.
    torch.testing.assert_close(processes[0]["model_losses"], single["model_losses"], rtol=1e-5, atol=0)
    torch.testing.assert_close(processes[1]["model_losses"], processes[0]["model_losses"], rtol=0, atol=0)


def test_global_matrix_gives_the_single_process_loss_and_gradient(probes):
    single, processes = probes["single"][0], probes["global"]
    for process in processes:
        torch.testing.assert_close(process["loss"], single["loss"], rtol=1e-6, atol=0)
    assert torch.equal(processes[0]["gradient"], processes[1]["gradient"])  # DDP averaged
    assert relative_difference(processes[0]["gradient"], single["gradient"]) < 1e-4


def test_global_matrix_with_accumulation_equals_one_process_with_the_same_micro_batches(probes):
    # Two micro-steps of 2 x 2 pairs vs two of 4 pairs: one matrix per micro-step, the same accumulated gradient.
    single, processes = probes["single_accumulated"][0], probes["global_accumulated"]
    pairs = torch.stack([p["pair_index"].view(2, 2) for p in processes], dim=1).flatten()  # micro-step, process
    assert torch.equal(pairs, single["pair_index"])
    torch.testing.assert_close(processes[0]["loss"], single["loss"], rtol=1e-6, atol=0)
    assert torch.equal(processes[0]["gradient"], processes[1]["gradient"])
    assert relative_difference(processes[0]["gradient"], single["gradient"]) < 1e-4


def test_per_process_matrices_give_a_different_gradient(probes):
    single, local = probes["single"][0], probes["local"]
    assert local[0]["model_losses"].shape[0] == 4  # each process's own 2 pairs (winners and losers)
    assert relative_difference(local[0]["gradient"], single["gradient"]) > 1e-2


@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_training_checkpoints_resumes_and_loads(
    sd_pipeline_path, pickapic_path, clip_model_path, tmp_path, streaming
):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out = tmp_path / "two"
    script = os.path.join(ROOT, "train_diffusion_rpo.py")
    dataset = pickapic_path
    if not streaming:  # two corrupt pairs (2 and 5): skipped in the dataset, so both processes keep full batches
        rows = tiny.corrupt_rows(tiny.pickapic_rows(18), [3, 7], kinds=["truncated", "missing"])
        dataset = tiny.write_pickapic_dataset(str(tmp_path / "corrupt"), rows)
    flags = cli(
        sd_pipeline_path,
        dataset,
        clip_model_path,
        out,
        "--train_batch_size",
        "2",
        "--rpo_global_matrix",
        "--checkpointing_steps",
        "1",
        "--dataloader_num_workers",
        "1",
        *(["--streaming"] if streaming else ["--max_bad_rows", "2"]),
    )
    if not streaming:  # past --max_bad_rows both processes stop with the error, and exit (no hang in collectives)
        failed = launch(
            script,
            [*flags, "--max_bad_rows", "1", "--output_dir", str(tmp_path / "strict")],
            2,
            tmp_path,
            succeed=False,
        )
        assert "2 pairs could not be decoded by the loader" in failed.stderr
    launch(script, flags, 2, tmp_path)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    if streaming:  # the main process's progress file holds both processes' stream readers
        with open(out / "checkpoint-2" / "training_progress.json") as f:
            progress = json.load(f)
        states = progress["stream_states"]
        assert sorted(state["reader"] for state in states) == [0, 1]
        # Each process's StatefulDataLoader state: its one loader worker's stream reader, 2 steps x 2 pairs on
        readers = [state["loader"]["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"] for state in states]
        assert [(reader["epoch"], reader["position"]) for reader in readers] == [(0, 4)] * 2, progress
    result = launch(script, [*flags, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"], 2, tmp_path)
    assert "Resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert "checkpoint-3" in os.listdir(out)
    if not streaming:  # 3 steps x 2 processes x 2 pairs = the 12 pairs once: both corrupt pairs met, counted once
        with open(out / "checkpoint-3" / "training_progress.json") as f:
            assert json.load(f)["bad_rows"] == 2
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipeline, StableDiffusionPipeline)
    image = render(pipeline)
    assert image.shape == (32, 32, 3)


def test_accelerate_configs_load_and_agree_with_the_script():
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    import train_diffusion_rpo as rpo

    folder = os.path.join(ROOT, "configs", "accelerate")
    kinds = {"multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}
    for name, kind in kinds.items():
        config = load_config_from_file(os.path.join(folder, f"{name}.yaml"))
        assert config.distributed_type.value == kind and config.num_processes == 8
    deepspeed = load_config_from_file(os.path.join(folder, "deepspeed_zero2.yaml")).deepspeed_config
    with open(os.path.join(ROOT, deepspeed["deepspeed_config_file"])) as f:
        zero = json.load(f)
    assert zero["zero_optimization"]["stage"] == 2
    # DeepSpeed clips gradients itself (accelerator.clip_grad_norm_ defers to it): the same norm as the script's.
    assert zero["gradient_clipping"] == rpo.parse_args([]).max_grad_norm
    assert zero["zero_allow_untested_optimizer"] is True  # bitsandbytes AdamW8bit under ZeRO
    fsdp = load_config_from_file(os.path.join(folder, "fsdp.yaml")).fsdp_config
    import diffusers.models.attention
    import diffusers.models.resnet

    for layer in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(diffusers.models.attention, layer) or hasattr(diffusers.models.resnet, layer)


def launch_two_nodes(script, arguments, cwd):
    """The multi-node commands of docs/behaviour.md on one machine: two `accelerate launch --num_machines 2` of one process each,
    node 0 at 127.0.0.1 (loopback only), started together; both must succeed."""
    port = free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    nodes = []
    for rank in (0, 1):
        node = ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        command = launch_command(script, *arguments, processes=2, machines=2, launch_flags=node)
        nodes.append(
            subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-4000:]
    return outputs


def test_two_nodes_on_loopback_train_checkpoint_resume_and_equal_one_node(
    sd_pipeline_path, pickapic_path, clip_model_path, tmp_path
):
    from safetensors.torch import load_file

    script = os.path.join(ROOT, "train_diffusion_rpo.py")

    def flags(out, steps, *extra):
        return cli(
            sd_pipeline_path,
            pickapic_path,
            clip_model_path,
            out,
            "--validation_prompts",
            "--train_batch_size",
            "2",
            "--rpo_global_matrix",
            "--checkpointing_steps",
            "2",
            "--max_train_steps",
            str(steps),
            *extra,
        )

    launch(script, flags(tmp_path / "one-node", 3), 2, tmp_path)
    launch_two_nodes(script, flags(tmp_path / "two-nodes", 2), tmp_path)
    assert (tmp_path / "two-nodes" / "checkpoint-2" / "training_progress.json").exists()
    (_, node0), _ = launch_two_nodes(
        script, flags(tmp_path / "two-nodes", 3, "--resume_from_checkpoint", "latest"), tmp_path
    )
    assert "Resuming from" in node0 and "checkpoint-2" in node0
    weights = [
        load_file(tmp_path / run / "unet" / "diffusion_pytorch_model.safetensors") for run in ("one-node", "two-nodes")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bitwise: same data, same reductions
