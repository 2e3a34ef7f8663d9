"""A reduced run of the style world in CI: RPO alignment of the committed base learns the style on held-out captions."""

import json
import os

import pytest

from demo import evaluate, style_world

RECORD = os.path.join(os.path.dirname(style_world.__file__), "results", "ci_record.json")


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


def test_committed_base_matches_its_checksums():
    style_world.check_assets(style_world.ASSETS)


def test_rpo_alignment_learns_the_style_without_losing_the_content(record, tmp_path):
    """The gain must exceed the margin derived from the recorded spread over seeds (see ci_record.json)."""
    items = style_world.evaluation_items(record["samples_per_scene"])
    base = style_world.base_score(items, record["style"], style_world.ASSETS)
    dataset = style_world.write_preferences(str(tmp_path), record["style"])
    output_dir = str(tmp_path / "rpo")
    style_world.train("rpo", record["config"], dataset, output_dir, record["seed"], record["steps"],
                      style_world.ASSETS)
    aligned = evaluate.score(evaluate.sample(evaluate.load_pipeline(os.path.join(style_world.ASSETS, "base"),
                                                                    output_dir), items), items, record["style"])
    assert aligned["style_hit_rate"] - base["style_hit_rate"] >= record["required_gain"], (base, aligned)
    assert aligned["content_accuracy"] >= record["min_content_accuracy"], (base, aligned)
