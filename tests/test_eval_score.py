"""eval.score end to end on generated folders: per-image scores, summary, win rates, pictures, bad inputs."""

import json
import os

import pytest
from helpers import FAST_GENERATION, generate_model_and_baseline, weight_flags
from PIL import Image

from eval import score
from eval.image_folder import read_metadata


METRICS = "pickscore,hpsv2.1,aesthetic,clip"


@pytest.fixture(scope="module")
def folders(sd_pipeline_path, prompt_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    generate_model_and_baseline(sd_pipeline_path, prompt_file, root, *FAST_GENERATION, "--images_per_prompt", "2")
    return root


def test_scores_summary_and_win_rates(folders, scorer_weights, tmp_path):
    result = score.main(
        [
            "--images",
            str(folders / "model"),
            "--baseline",
            str(folders / "baseline"),
            "--metrics",
            METRICS,
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            *weight_flags(scorer_weights),
        ]
    )
    with open(tmp_path / "scores.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 8 and set(METRICS.split(",")) <= set(rows[0])
    for metric in METRICS.split(","):
        values = [row[metric] for row in rows]
        assert result["summary"]["model"][metric]["mean"] == pytest.approx(sum(values) / len(values))
        outcome = result["win_rates"][metric]
        assert outcome["n"] == 4 and outcome["wins"] + outcome["ties"] + outcome["losses"] == 4
        assert outcome["ci_low"] <= outcome["win_rate"] <= outcome["ci_high"]
    assert result["summary"]["model"]["pickscore"] != result["summary"]["baseline"]["pickscore"]
    assert "100 * max(cosine, 0)" in result["metrics"]["clip"]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["win_rates"] == result["win_rates"]
    assert "| pickscore |" in (tmp_path / "summary.md").read_text()
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "win_rates.png") as chart:
        assert grid.width > grid.height and chart.width > 200


def test_a_model_against_itself_ties_everywhere(folders, scorer_weights, tmp_path):
    result = score.main(
        [
            "--images",
            str(folders / "model"),
            "--baseline",
            str(folders / "model"),
            "--metrics",
            "clip",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            *weight_flags(scorer_weights),
        ]
    )
    assert result["win_rates"]["clip"]["ties"] == 4 and result["win_rates"]["clip"]["win_rate"] == 0.5


@pytest.mark.parametrize(
    "damage,error,message",
    [
        ("missing", FileNotFoundError, "00000_0.png.*is missing"),
        ("truncated", ValueError, "00000_0.png.*cannot be read"),
    ],
)
def test_missing_or_unreadable_image_is_named(folders, scorer_weights, tmp_path, damage, error, message):
    broken = tmp_path / "broken"
    os.makedirs(broken / "images")
    entries = read_metadata(folders / "model")
    with open(broken / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    if damage == "truncated":
        for entry in entries:
            data = (folders / "model" / entry["file"]).read_bytes()
            (broken / entry["file"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(error, match=message):
        score.main(["--images", str(broken), "--metrics", "clip", "--device", "cpu", *weight_flags(scorer_weights)])


def test_folders_without_metadata_or_with_other_prompts_are_refused(folders, scorer_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.generate"):
        score.main(["--images", str(tmp_path), "--metrics", "clip", *weight_flags(scorer_weights)])
    fewer = tmp_path / "fewer"
    os.makedirs(fewer)
    with open(fewer / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in read_metadata(folders / "baseline")[:4])
    with pytest.raises(ValueError, match="different images"):
        score.main(
            [
                "--images",
                str(folders / "model"),
                "--baseline",
                str(fewer),
                "--metrics",
                "clip",
                *weight_flags(scorer_weights),
            ]
        )


def test_unknown_metric_fails_before_any_model_loads(folders):
    with pytest.raises(ValueError, match="Unknown metric"):
        score.main(["--images", str(folders / "model"), "--metrics", "pickscore,fid"])
