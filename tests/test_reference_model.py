"""--reference_model_name_or_path: training on from fine-tuned weights against another pipeline's (e.g. the original
base), full and LoRA, and the refusals (sft, another architecture)."""

import pytest
from helpers import LN2_FP32, SD15


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_continued_training_is_measured_against_the_given_reference(train, script, tmp_path, caplog, lora):
    one_step = ("--loss_type", "dpo", "--validation_prompts", "--max_train_steps", "1")
    first, _ = train(*one_step, "--no-use_lora", output_dir="first")  # a full pipeline to continue from
    assert first.history[0]["loss"] == LN2_FP32
    mode = "--use_lora" if lora else "--no-use_lora"
    from_base, _ = train(*one_step, mode, output_dir="from-base")
    argv = train.flags(*one_step, mode, "--reference_model_name_or_path", script.pipeline, output_dir="continued")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "first")
    caplog.clear()
    continued = script.module.main(script.module.parse_args(argv)).history[0]
    # The policy starts at the first run's weights; the reference computes the base's errors on the same pairs.
    assert (continued["ref_mse_w"], continued["ref_mse_l"]) == (
        from_base.history[0]["ref_mse_w"],
        from_base.history[0]["ref_mse_l"],
    )
    assert continued["model_mse_w"] != continued["ref_mse_w"] and continued["loss"] != LN2_FP32
    assert "not ln 2" not in caplog.text  # a separate reference is not expected to start at ln 2


@SD15
def test_a_reference_of_another_architecture_or_with_sft_is_refused(train, sdxl_pipeline_path, capsys):
    with pytest.raises(ValueError, match="another architecture"):
        train("--reference_model_name_or_path", sdxl_pipeline_path, "--validation_prompts")
    with pytest.raises(SystemExit):
        train.parse("--reference_model_name_or_path", sdxl_pipeline_path, "--loss_type", "sft")
    assert f"--reference_model_name_or_path {sdxl_pipeline_path} needs a preference loss" in capsys.readouterr().err
