"""Flags: every documented command parses with a sane learning rate, numeric flags are range-checked, defaults that
depend on other flags are resolved before anything loads, and what a run records reproduces it."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

import train_diffusion_rpo as rpo
import train_diffusion_rpo_flux as rpo_flux
import train_diffusion_rpo_sd3 as rpo_sd3
import train_diffusion_rpo_sdxl as rpo_sdxl


SCRIPTS = {module.SCRIPT_NAME: module for module in (rpo, rpo_sdxl, rpo_sd3, rpo_flux)}


def documented_commands():
    """Every `accelerate launch ... train_*.py ...` command in README.md and docs/: (source, launch flags, script
    flags), with shell comments, the `...` elisions of abbreviated commands and a trailing `&` removed."""
    commands = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
        for line in text.splitlines():
            if "accelerate launch" not in line or not re.search(r"train_diffusion_rpo(_sdxl|_sd3|_flux)?\.py", line):
                continue
            if line.lstrip().startswith("python online_rpo.py"):  # its --launcher names accelerate: tested apart
                continue
            tokens = shlex.split(line[line.index("accelerate launch") :].strip("`"), comments=True)
            script = next(i for i, token in enumerate(tokens) if token in SCRIPTS)
            commands.append(
                (
                    os.path.relpath(path, ROOT),
                    tokens[2:script],
                    tokens[script],
                    [t for t in tokens[script + 1 :] if t not in ("...", "&")],
                )
            )
    return commands


def launch_processes(launch_flags):
    """The process count a launch runs: --num_processes, else its --config_file's, else 1."""
    if "--num_processes" in launch_flags:
        return int(launch_flags[launch_flags.index("--num_processes") + 1])
    if "--config_file" in launch_flags:
        with open(os.path.join(ROOT, launch_flags[launch_flags.index("--config_file") + 1])) as f:
            return int(yaml.safe_load(f)["num_processes"])
    return 1


def test_documented_commands_parse_and_train_at_a_sane_learning_rate():
    commands = documented_commands()
    assert len(commands) >= 6  # SD1.5, SDXL, SD3, FLUX, multi-GPU, multi-node at least
    assert {script for _, _, script, _ in commands} == set(SCRIPTS)
    low, high = rpo.SANE_LEARNING_RATES
    for source, launch_flags, script, flags in commands:
        args = SCRIPTS[script].parse_args(flags)
        for processes in sorted({1, launch_processes(launch_flags)}):
            rate = rpo.effective_learning_rate(args, processes)
            assert low <= rate <= high, (source, script, flags, processes, rate)


def test_learning_rate_defaults_depend_on_the_mode(capsys):
    assert rpo.parse_args([]).learning_rate == rpo.DEFAULT_LEARNING_RATE == 1e-5
    assert rpo.parse_args(["--use_lora"]).learning_rate == rpo.DEFAULT_LORA_LEARNING_RATE == 1e-4
    with pytest.raises(SystemExit):
        rpo.parse_args(["--scale_lr"])  # the per-pair rate must be given: 1e-5 x 2048 pairs would diverge
    assert "--scale_lr multiplies --learning_rate" in capsys.readouterr().err
    args = rpo.parse_args(
        ["--learning_rate", "1e-8", "--scale_lr", "--train_batch_size", "8", "--gradient_accumulation_steps", "32"]
    )
    assert rpo.effective_learning_rate(args, 8) == pytest.approx(2.048e-5)  # DiffusionDPO's recipe
    assert args.learning_rate == 1e-8  # args keep what was passed


def test_an_effective_learning_rate_outside_the_sane_range_is_warned(caplog):
    from accelerate import PartialState

    PartialState()  # the script's logger needs accelerate's state, as in a run
    rpo.effective_learning_rate(rpo.parse_args(["--learning_rate", "1e-8"]), 1)
    assert "barely move" in caplog.text
    caplog.clear()
    rpo.effective_learning_rate(rpo.parse_args(["--learning_rate", "1e-4", "--scale_lr"]), 8)  # 6.4e-3
    assert "diverge" in caplog.text
    caplog.clear()
    rpo.effective_learning_rate(rpo.parse_args([]), 1)
    assert caplog.text == ""


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--train_batch_size", "0"], "argument --train_batch_size: 0 is out of range: it must be at least 1."),
        (["--train_batch_size", "2.5"], "argument --train_batch_size: invalid int value: '2.5'"),
        (["--seed", "-1"], "argument --seed: -1 is out of range: it must be at least 0."),
        (
            ["--proportion_empty_prompts", "1.5"],
            "--proportion_empty_prompts: 1.5 is out of range: it must be at least 0 and at most 1.",
        ),
        (["--adam_beta2", "1"], "argument --adam_beta2: 1 is out of range: it must be at least 0 and below 1."),
        (["--learning_rate", "0"], "argument --learning_rate: 0 is out of range: it must be above 0."),
        (["--learning_rate", "nan"], "argument --learning_rate: nan is out of range: it must be above 0."),
        (["--ema_decay", "nan"], "argument --ema_decay: nan is out of range"),
        (["--max_bad_rows", "nan"], "--max_bad_rows nan: pass a fraction below 1 or a whole count"),
        (["--resolution", "12"], "--resolution 12 must be a multiple of 8"),
        (["--use_8bit_adam", "--use_adafactor"], "--use_8bit_adam sets up AdamW, but --use_adafactor trains with"),
        (
            ["--streaming", "--max_train_steps", "9", "--max_train_samples", "4"],
            "--streaming needs --max_train_steps (a stream has no length) and no --max_train_samples",
        ),
    ],
)
def test_out_of_range_values_and_impossible_combinations_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        rpo.parse_args(flags)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_ends_of_each_range_are_accepted():
    edges = {"--proportion_empty_prompts": 1.0, "--ema_decay": 0.0, "--adam_beta1": 0.0, "--max_bad_rows": 0.0}
    edges |= {"--seed": 0, "--lr_warmup_steps": 0, "--resolution": 8, "--learning_rate": 1e-12, "--noise_offset": 0.0}
    args = rpo.parse_args([token for flag, value in edges.items() for token in (flag, str(value))])
    assert all(getattr(args, flag[2:]) == value for flag, value in edges.items())
    assert rpo.parse_args(["--max_bad_rows", "3"]).max_bad_rows == 3  # a count
    assert rpo.parse_args(["--max_train_steps", "0"]).max_train_steps is None  # 0: from the epochs


def test_a_refused_flag_stops_the_script_before_anything_loads(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "train_diffusion_rpo.py"), "--output_dir", str(tmp_path / "out")]
    missing = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "no-model"),
        "--dataset_name",
        str(tmp_path / "no-data"),
    ]
    result = subprocess.run(
        [*command, *missing, "--train_batch_size", "0"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "error: argument --train_batch_size: 0 is out of range: it must be at least 1." in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_validation_steps_0_explains_how_to_turn_validation_off(capsys):
    with pytest.raises(SystemExit):
        rpo.parse_args(["--validation_steps", "0"])
    assert "pass --validation_prompts with no prompts" in capsys.readouterr().err
    assert rpo.parse_args(["--validation_prompts"]).validation_prompts == []


def test_adafactor_refuses_adam_settings_and_turns_clipping_off(capsys):
    assert rpo.parse_args([]).max_grad_norm == 1.0
    adafactor = rpo.parse_args(["--use_adafactor"])
    assert adafactor.max_grad_norm == 0.0  # its update clipping replaces gradient clipping (DiffusionDPO)
    assert rpo.parse_args(["--use_adafactor", "--max_grad_norm", "1"]).max_grad_norm == 1.0  # asked for: kept
    assert (
        rpo.parse_args(["--use_adafactor", "--adam_weight_decay", "0.1"]).adam_weight_decay == 0.1
    )  # Adafactor's too
    for flag, value in (("--adam_beta1", "0.8"), ("--adam_beta2", "0.99"), ("--adam_epsilon", "1e-6")):
        with pytest.raises(SystemExit):
            rpo.parse_args(["--use_adafactor", flag, value])
        assert f"{flag} sets up AdamW" in capsys.readouterr().err


def test_epochs_set_the_steps_unless_max_train_steps(train):
    progress, _ = train("--validation_prompts", "--num_train_epochs", "2", omit=["--max_train_steps"])
    assert progress.global_step == 2 * (12 // 3)  # 12 pairs, 3 per step, 2 epochs


def test_card_and_trackers_record_the_rate_as_passed_and_as_trained(train, tmp_path):
    args = train.parse("--validation_prompts", "--learning_rate", "1e-4", "--scale_lr")
    assert train.module.tracker_config(args, 3e-4)["effective_learning_rate"] == 3e-4
    assert train.module.tracker_config(args, 3e-4)["learning_rate"] == 1e-4
    train.module.main(args)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| learning_rate, scale_lr (as passed) | 0.0001, True |" in card
    assert "| effective learning rate | 0.0003 |" in card  # 1e-4 x 3 pairs x 1 step x 1 process
