"""Fault injection: corrupt rows, non-finite losses, stop signals, broken checkpoints, pickle-free resumes.

Each test injects one fault into a real run of train_diffusion_rpo (in-process, or under `accelerate launch` where
the fault is a signal to the process group) and asserts what the "Failure handling" table of docs/behaviour.md promises.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import datasets
import pytest
import tiny
import torch
from helpers import COLUMNS, ROOT, build_latent_cache, free_port, launch, launch_command, unet_weights
from safetensors.torch import load_file

import train_diffusion_rpo as rpo


# Rows 3 and 7 of tiny.pickapic_rows(18) are pairs 2 and 5 once the 6 ties are dropped (not adjacent, so each is
# read once per epoch: a replacement never runs into the other).
CORRUPT_ROWS, CORRUPT_PAIRS = [3, 7], [2, 5]


@pytest.fixture(scope="module")
def corrupt_pickapic(tmp_path_factory):
    rows = tiny.corrupt_rows(tiny.pickapic_rows(18), CORRUPT_ROWS, kinds=["truncated", "zero_bytes"])
    return tiny.write_pickapic_dataset(str(tmp_path_factory.mktemp("corrupt")), rows)


def checkpoint_progress(folder):
    with open(os.path.join(folder, rpo.PROGRESS_FILE)) as f:
        return json.load(f)


def checkpoint_names(folder):
    return sorted((p for p in os.listdir(folder) if p.startswith("checkpoint")), key=lambda p: (len(p), p))


def checkpoint_weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# Corrupt rows
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_rows_are_skipped_counted_and_checkpointed(train, corrupt_pickapic, tmp_path, workers, caplog):
    # 4 steps x 3 pairs read the 12 pairs once: both corrupt pairs are met once each.
    progress, _ = train(
        "--validation_prompts",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "4",
        "--max_bad_rows",
        "2",
        "--dataloader_num_workers",
        str(workers),
        dataset=corrupt_pickapic,
    )
    assert progress.global_step == 4 and progress.bad_rows == 2
    assert progress.history[-1]["bad_rows"] == 2
    assert checkpoint_progress(tmp_path / "out" / "checkpoint-4")["bad_rows"] == 2
    assert "undecodable pairs skipped (2 in all)" in caplog.text
    if workers == 0:  # (workers log to their own stderr)
        assert all(f"Pair {pair}: cannot decode" in caplog.text for pair in CORRUPT_PAIRS)
    assert (tmp_path / "out" / "unet").is_dir()


@pytest.mark.parametrize("limit", ["1", "0.1"])  # a count, and a fraction of the 12 pairs the run reads (1.2 -> 1)
def test_too_many_corrupt_rows_stop_the_run_and_keep_a_checkpoint(train, corrupt_pickapic, tmp_path, limit):
    with pytest.raises(RuntimeError, match=r"2 pairs could not be decoded by the loader .*allows 1 of 12"):
        train(
            "--validation_prompts",
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "100",
            "--max_bad_rows",
            limit,
            dataset=corrupt_pickapic,
        )
    checkpoints = rpo.list_checkpoints(tmp_path / "out")
    assert len(checkpoints) == 1 and checkpoint_progress(checkpoints[0])["bad_rows"] == 2
    assert not (tmp_path / "out" / "unet").exists()  # not a finished model


def test_latent_cache_leaves_corrupt_rows_out_and_counts_them(train, corrupt_pickapic, tmp_path, caplog):
    with pytest.raises(RuntimeError, match="2 pairs could not be decoded while building the latent cache"):
        build_latent_cache(train, "--max_bad_rows", "1", output_dir="strict", dataset=corrupt_pickapic)
    cache = build_latent_cache(train, "--max_bad_rows", "2", dataset=corrupt_pickapic)
    assert "2 of 12 pairs could not be decoded (or gave non-finite latents) and are left out" in caplog.text
    assert len(datasets.load_from_disk(cache)) == 10
    train("--validation_prompts", "--max_train_steps", "3", dataset=cache)
    assert "10 preference pairs used" in (tmp_path / "out" / "README.md").read_text()


def test_streamed_corrupt_rows_are_skipped_in_full_batches(corrupt_pickapic):
    stream = datasets.load_dataset(corrupt_pickapic, split="train", streaming=True)
    stream = rpo.prepare_streaming_dataset(stream, COLUMNS, seed=0, shuffle_buffer_size=0)
    pairs = rpo.StreamingPairDataset(stream, rpo.PairMaker(COLUMNS, 32, 0))
    batches = torch.utils.data.DataLoader(pairs, batch_size=2, collate_fn=rpo.collate_pairs)
    epoch = [batch for _, batch in zip(range(5), batches)]  # 12 pairs, 2 bad: 5 full batches of 2
    assert all(batch["pixel_values"].shape[0] == 4 for batch in epoch)
    assert sum(int(batch["bad_rows"]) for batch in epoch) == 2
    assert pairs.state_dict()["position"] == 12


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# ---------------------------------------------------------------------------------------------------------------------


def poison_losses(monkeypatch, module, from_call, until_call=None):
    """Makes compute_preference_loss return NaN on its calls from_call..until_call (1-based): a NaN loss, and so NaN
    gradients, as an fp16 overflow or a NaN latent would give."""
    calls = {"count": 0}
    original = module.compute_preference_loss

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        loss, metrics = original(*args, **kwargs)
        if from_call <= calls["count"] <= (until_call or sys.maxsize):
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(module, "compute_preference_loss", poisoned)


def test_a_nonfinite_loss_skips_the_update(train, script, tmp_path, monkeypatch, caplog):
    poison_losses(monkeypatch, script.module, from_call=2, until_call=2)
    progress, _ = train("--validation_prompts", "--max_train_steps", "4", "--checkpointing_steps", "1")
    assert progress.skipped_updates == 1 and progress.nonfinite_in_a_row == 0
    assert "Step 2: non-finite loss or gradient; update skipped" in caplog.text
    out = tmp_path / "out"
    first, second, third = (checkpoint_weights(out / f"checkpoint-{step}") for step in (1, 2, 3))
    assert same_weights(first, second) and not same_weights(second, third)
    moments = [torch.load(out / f"checkpoint-{step}" / "optimizer.bin", weights_only=True)["state"] for step in (1, 2)]
    assert all(torch.equal(moments[0][k]["exp_avg"], moments[1][k]["exp_avg"]) for k in moments[0])
    assert all(torch.isfinite(w).all() for w in unet_weights(out).values())


def test_a_skipped_update_does_not_advance_the_learning_rate_schedule(train, script, monkeypatch):
    # Warmup over 4 steps: lr after step k is k/4 of the peak; step 2 is skipped, so step 3 trains at step 2's rate.
    poison_losses(monkeypatch, script.module, from_call=2, until_call=2)
    progress, _ = train(
        "--validation_prompts",
        "--max_train_steps",
        "4",
        "--lr_scheduler",
        "constant_with_warmup",
        "--lr_warmup_steps",
        "4",
        "--learning_rate",
        "1e-3",
    )
    assert [h["lr"] for h in progress.history] == pytest.approx([2.5e-4, 2.5e-4, 5e-4, 7.5e-4])


def test_nonfinite_steps_in_a_row_stop_the_run_at_the_last_good_weights(train, script, tmp_path, monkeypatch):
    poison_losses(monkeypatch, script.module, from_call=2)
    with pytest.raises(
        RuntimeError, match="3 optimizer steps in a row .*non-finite.*last checkpoint is .*checkpoint-3"
    ):
        train(
            "--validation_prompts",
            "--max_train_steps",
            "6",
            "--checkpointing_steps",
            "1",
            "--max_nonfinite_steps",
            "3",
        )
    out = tmp_path / "out"
    # Stopped at step 4 before its save; steps 2 and 3 were skipped, so checkpoint-3 holds step 1's weights.
    assert checkpoint_names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert same_weights(checkpoint_weights(out / "checkpoint-3"), checkpoint_weights(out / "checkpoint-1"))
    assert not (out / "unet").exists()


def test_guard_skips_nonfinite_gradients_but_leaves_fp16_overflow_to_the_scaler():
    def verdict(grad_norm, scaler=None, loss=0.5):
        guard = rpo.StepGuard(SimpleNamespace(scaler=scaler, device=torch.device("cpu"), num_processes=1))
        guard.observe(torch.tensor(loss), {"bad_rows": torch.tensor(1)})
        return guard.agree(grad_norm)

    assert not verdict(torch.tensor(3.0)).skip_update and verdict(torch.tensor(3.0)).bad_rows == 1
    assert verdict(torch.tensor(float("inf"))).skip_update
    assert not verdict(torch.tensor(float("inf")), scaler=object()).skip_update  # GradScaler skips it and rescales
    assert verdict(torch.tensor(1.0), scaler=object(), loss=float("nan")).skip_update


# ---------------------------------------------------------------------------------------------------------------------
# Stop signals and exact resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sigint_disposition():
    """Sets SIGINT's disposition for one test and restores the inherited one: a suite started in the background
    (`make test &`, nohup, a batch scheduler) inherits SIGINT ignored, and tests must not depend on that."""
    inherited = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, inherited)


def test_sigint_saves_a_checkpoint_and_a_resume_matches_the_straight_run(
    train, script, tmp_path, monkeypatch, sigint_disposition
):
    sigint_disposition(signal.default_int_handler)
    straight, _ = train(
        "--validation_prompts", "--max_train_steps", "4", "--checkpointing_steps", "100", output_dir="straight"
    )
    original = script.module.record_faults

    def interrupt_at_step_2(args, progress, verdict, logs):
        original(args, progress, verdict, logs)
        if progress.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2's bookkeeping: seen at step 3's update

    monkeypatch.setattr(script.module, "record_faults", interrupt_at_step_2)
    stopped, _ = train(
        "--validation_prompts", "--max_train_steps", "4", "--checkpointing_steps", "100", output_dir="split"
    )
    monkeypatch.setattr(script.module, "record_faults", original)
    assert stopped.stopped_by == "SIGINT" and stopped.global_step == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert checkpoint_names(tmp_path / "split") == ["checkpoint-3"] and not (tmp_path / "split" / "unet").exists()
    resumed, _ = train(
        "--validation_prompts",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "100",
        "--resume_from_checkpoint",
        "latest",
        output_dir="split",
    )
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    assert same_weights(unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split"))


def test_sigint_ignored_at_start_stays_ignored(train, script, tmp_path, monkeypatch, sigint_disposition):
    sigint_disposition(signal.SIG_IGN)  # as `nohup` or `&` start a run
    original = script.module.record_faults

    def interrupt_at_step_1(args, progress, verdict, logs):
        original(args, progress, verdict, logs)
        if progress.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(script.module, "record_faults", interrupt_at_step_1)
    progress, _ = train(
        "--validation_prompts", "--max_train_steps", "3", "--checkpointing_steps", "100", output_dir="ignored"
    )
    assert progress.stopped_by is None and progress.global_step == 3 and (tmp_path / "ignored" / "unet").exists()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.fixture(scope="module")
def pickapic_36_pairs(tmp_path_factory):
    return tiny.write_pickapic_dataset(str(tmp_path_factory.mktemp("pickapic-36")), tiny.pickapic_rows(54))


LAUNCHER_GRACE_S = 5  # accelerate launch (1.16+, one process) SIGKILLs 5 s after forwarding SIGTERM


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-process"])
def test_sigterm_mid_step_to_a_launched_run_saves_and_the_resume_is_bitwise_exact(
    train, script, tmp_path, pickapic_36_pairs, processes
):
    """Preemption under the launchers' grace: SIGTERM to the whole process group (launcher, trainer, loader workers),
    as SLURM and Ctrl-C do, while an optimizer step of 36 micro-batches (several seconds, longer than the grace) runs.
    accelerate's one-process launcher SIGKILLs 5 s after SIGTERM; the 2-process launch runs torchrun's agent with the
    same 5 s grace (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; its default is 30 s). The run must stop at the next micro-batch,
    save the last completed step with the data position of the interrupted one, and resume from it to exactly the
    weights of an uninterrupted run (in-process for one process, with the launched run's thread count; launched for
    two)."""
    if processes == 2 and script.name != "sd15":
        pytest.skip("the shared code path: one script suffices for the 2-process launch")
    accumulation = str(36 // processes)
    steps = ["--max_train_steps", "2", "--train_batch_size", "1", "--gradient_accumulation_steps", accumulation]
    common = ["--validation_prompts", "--resolution", "64", "--checkpointing_steps", "100", *steps]
    flags = train.flags(*common, "--dataloader_num_workers", "2", output_dir="split", dataset=pickapic_36_pairs)
    env = {**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "1"}
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(LAUNCHER_GRACE_S)
    if processes == 1:
        launch_flags = ["--num_cpu_threads_per_process", str(torch.get_num_threads())]
    else:
        launch_flags = ["--main_process_port", str(free_port())]
    command = launch_command(script.path, *flags, processes=processes, launch_flags=launch_flags)
    run = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=tmp_path, env=env, start_new_session=True
    )
    stderr, first_step_done = [], threading.Event()

    def read_stderr():  # the progress bar shows "1/2" once step 1's update is applied
        while chunk := run.stderr.read1(4096):
            stderr.append(chunk.decode(errors="replace"))
            if re.search(r"Steps:[^\r\n]*\b1/2\b", "".join(stderr[-3:])):
                first_step_done.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert first_step_done.wait(300), "".join(stderr)[-3000:]
    time.sleep(1.0)  # into step 2's micro-batches
    sent = time.time()
    os.killpg(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    reader.join(timeout=10)
    log = "".join(stderr)
    assert "Received SIGTERM" in log and "Stopped by SIGTERM at step 1" in log, log[-3000:]
    assert "Traceback" not in log.split("Received SIGTERM")[1], log[-3000:]
    split = tmp_path / "split"
    assert [os.path.basename(p) for p in rpo.list_checkpoints(split)] == ["checkpoint-1"]
    saved = checkpoint_progress(split / "checkpoint-1")
    # Step 1 read the first epoch's 36 pairs: the resume starts step 2 at the second epoch's first micro-batch.
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == (1, 1, 0)
    save_latency = os.path.getmtime(split / "checkpoint-1" / rpo.PROGRESS_FILE) - sent
    print(f"{processes} process(es): checkpoint saved {save_latency:.2f} s after SIGTERM")

    resume = ["--resume_from_checkpoint", "latest"]
    if processes == 1:
        resumed, _ = train(*common, *resume, output_dir="split", dataset=pickapic_36_pairs)
        assert resumed.global_step == 2 and len(resumed.history) == 1
        train(*common, output_dir="straight", dataset=pickapic_36_pairs)
    else:
        launch(script.path, train.flags(*common, *resume, output_dir="split", dataset=pickapic_36_pairs), 2, tmp_path)
        launch(script.path, train.flags(*common, output_dir="straight", dataset=pickapic_36_pairs), 2, tmp_path)
    assert same_weights(unet_weights(tmp_path / "straight"), unet_weights(split))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------------------


def test_interrupted_and_broken_checkpoints_are_never_resumed(train, tmp_path, caplog):
    out = tmp_path / "out"
    train("--validation_prompts", "--max_train_steps", "2", "--checkpointing_steps", "2")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4.incomplete")  # a save killed before its rename
    os.remove(out / "checkpoint-4.incomplete" / rpo.PROGRESS_FILE)
    shutil.copytree(out / "checkpoint-4.incomplete", out / "checkpoint-6")  # a copy that broke off
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"")
    progress, _ = train(
        "--validation_prompts",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "100",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "Resuming from" in caplog.text and "checkpoint-2" in caplog.text.split("Resuming from")[1].splitlines()[0]
    assert len(progress.history) == 1  # steps 3 only
    assert "no training_progress.json, so it is incomplete" in caplog.text
    assert not (out / "checkpoint-4.incomplete").exists()


def test_total_limit_never_deletes_the_checkpoint_just_saved(train, tmp_path):
    out = tmp_path / "out"
    train("--validation_prompts", "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    # Resuming an earlier checkpoint: the new checkpoint-3 sorts before checkpoint-4, yet it is the one kept.
    train(
        "--validation_prompts",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "1",
        "--resume_from_checkpoint",
        str(out / "checkpoint-2"),
    )
    assert checkpoint_names(out) == ["checkpoint-3"]
    assert checkpoint_progress(out / "checkpoint-3")["global_step"] == 3


# ---------------------------------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------------------------------


def test_checkpoints_resume_without_unpickling_objects(train, tmp_path, monkeypatch):
    train("--validation_prompts", "--max_train_steps", "2", "--checkpointing_steps", "2", "--use_8bit_adam")
    files = os.listdir(tmp_path / "out" / "checkpoint-2")
    assert "model.safetensors" in files and not any(name.startswith("custom_checkpoint") for name in files)
    original = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only", True) is True, "a checkpoint file was unpickled with weights_only=False"
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    progress, _ = train(
        "--validation_prompts",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "100",
        "--use_8bit_adam",
        "--resume_from_checkpoint",
        "latest",
    )
    assert progress.global_step == 3 and len(progress.history) == 1


def test_no_code_path_runs_remote_or_pickled_code():
    sources = [os.path.join(ROOT, "train_diffusion_rpo.py"), os.path.join(ROOT, "train_diffusion_rpo_sdxl.py")]
    sources += [
        os.path.join(ROOT, "eval", name) for name in os.listdir(os.path.join(ROOT, "eval")) if name.endswith(".py")
    ]
    for path in sources:
        text = open(path).read()
        assert "trust_remote_code=True" not in text and "weights_only=False" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


# ---------------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max_bad_rows", "1.5"], "pass a fraction below 1"),
        (["--max_bad_rows", "-1"], "pass a fraction below 1"),
        (["--max_nonfinite_steps", "0"], "argument --max_nonfinite_steps: 0 is out of range: it must be at least 1"),
        (["--clip_model_name_or_path", ""], "needs a CLIP model"),
    ],
)
def test_bad_reliability_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(flags)
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Edges found in review
# ---------------------------------------------------------------------------------------------------------------------


def test_resume_without_a_seed_uses_the_checkpoint_seed_for_the_data(train, tmp_path):
    # No --seed: a seed is drawn, and the --max_train_samples subset, the order and every draw depend on it; the
    # resumed run must prepare its data with the checkpoint's seed, not a new draw.
    common = ["--max_train_samples", "8", "--train_batch_size", "2", "--checkpointing_steps", "2"]
    train("--validation_prompts", *common, "--max_train_steps", "2", output_dir="split", omit=["--seed"])
    seed = checkpoint_progress(tmp_path / "split" / "checkpoint-2")["seed"]
    resumed, _ = train(
        "--validation_prompts",
        *common,
        "--max_train_steps",
        "4",
        "--resume_from_checkpoint",
        "latest",
        output_dir="split",
        omit=["--seed"],
    )
    straight, _ = train(
        "--validation_prompts",
        *common,
        "--max_train_steps",
        "4",
        "--seed",
        str(seed),
        output_dir="straight",
        omit=["--seed"],
    )
    assert resumed.seed == seed
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]
    assert same_weights(unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "split"))


def test_the_stop_file_stops_the_run_and_is_removed(train, script, tmp_path, monkeypatch):
    """The stop file (default output_dir/STOP) asks for a stop like SIGTERM, at the next micro-batch: here the first
    of step 2, so the checkpoint is step 1's with the data position of step 2's start. It is removed once acted on,
    and a stale one found at start is removed without stopping the run."""
    original = script.module.record_faults
    stop_file = tmp_path / "out" / "STOP"

    def request_stop_at_step_1(args, progress, verdict, logs):
        original(args, progress, verdict, logs)
        if progress.global_step == 1:
            stop_file.touch()

    monkeypatch.setattr(script.module, "record_faults", request_stop_at_step_1)
    flags = ["--validation_prompts", "--max_train_steps", "4", "--gradient_accumulation_steps", "2"]
    stopped, _ = train(*flags, "--checkpointing_steps", "100")
    assert stopped.stopped_by == "the stop file" and stopped.global_step == 1 and not stop_file.exists()
    saved = checkpoint_progress(tmp_path / "out" / "checkpoint-1")  # 12 pairs, 3 per micro-batch: 2 steps an epoch
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == (1, 0, 2)
    assert checkpoint_names(tmp_path / "out") == ["checkpoint-1"] and not (tmp_path / "out" / "unet").exists()

    monkeypatch.setattr(script.module, "record_faults", original)
    stop_file.touch()  # left over, e.g. by a scheduler's warning that came after the run had stopped
    resumed, _ = train(*flags, "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest")
    assert resumed.stopped_by is None and resumed.global_step == 4 and not stop_file.exists()


def test_a_stop_at_the_final_step_finishes_the_run(train, script, tmp_path, monkeypatch):
    original = script.module.record_faults

    def interrupt_at_step_1(args, progress, verdict, logs):
        original(args, progress, verdict, logs)
        if progress.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # seen at step 2, the last one

    monkeypatch.setattr(script.module, "record_faults", interrupt_at_step_1)
    progress, _ = train("--validation_prompts", "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert progress.stopped_by is None and (tmp_path / "out" / "unet").is_dir()
    monkeypatch.setattr(script.module, "record_faults", original)
    # Resuming the final checkpoint trains no extra step.
    again, _ = train("--validation_prompts", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert again.global_step == 2 and again.history == []


def test_fp16_steps_the_scaler_skips_below_scale_1_count_as_nonfinite():
    class Scaler:
        def __init__(self, scale):
            self.scale = scale

        def get_scale(self):
            return self.scale

    def counted(scale, skipped):
        guard = rpo.StepGuard(SimpleNamespace(scaler=Scaler(scale), device=torch.device("cpu"), num_processes=1))
        guard.observe(torch.tensor(0.5), {})
        guard.agree(torch.tensor(float("inf")))
        guard.note_scaler_skip(SimpleNamespace(step_was_skipped=skipped))
        return guard.nonfinite

    assert not counted(1024.0, True)  # an ordinary fp16 overflow: the scaler backs off, not counted
    assert counted(0.5, True) and not counted(0.5, False)
