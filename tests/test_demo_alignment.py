"""The style world in CI: the demo's method and configuration, chosen on the tuning styles, learn the held-out style
(one no sweep that chose a setting has seen) on held-out captions without losing the content."""

import json
import os

import pytest

from demo import evaluate, style_world, world


RECORD = os.path.join(os.path.dirname(style_world.__file__), "results", "ci_record.json")


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


def test_committed_base_matches_its_checksums():
    style_world.check_assets(style_world.ASSETS)


def test_record_is_for_the_held_out_style_and_the_demo_configuration(record):
    assert record["style"] == world.HELD_OUT_STYLE and record["style"] not in world.TUNING_STYLES
    assert (record["method"], record["config"]) == (style_world.DEMO_METHOD, style_world.DEMO_CONFIG)


@pytest.fixture
def recorded_threads(record):
    """The record's thread count (its runs used one thread per process): the same arithmetic as recorded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(record["threads"])
    yield
    torch.set_num_threads(before)


def test_demo_alignment_learns_the_held_out_style_without_losing_the_content(record, recorded_threads, tmp_path):
    """The gain must exceed the margin derived from the recorded spread over seeds (see ci_record.json)."""
    items = style_world.evaluation_items(record["samples_per_scene"])
    base = style_world.base_score(items, record["style"], style_world.ASSETS)
    dataset = style_world.write_preferences(str(tmp_path), record["style"])
    output_dir = str(tmp_path / "aligned")
    style_world.train(
        record["method"], record["config"], dataset, output_dir, record["seed"], record["steps"], style_world.ASSETS
    )
    aligned = evaluate.score(
        evaluate.sample(evaluate.load_pipeline(os.path.join(style_world.ASSETS, "base"), output_dir), items),
        items,
        record["style"],
    )
    assert aligned["style_hit_rate"] - base["style_hit_rate"] >= record["required_gain"], (base, aligned)
    assert aligned["content_accuracy"] >= record["min_content_accuracy"], (base, aligned)


def test_demo_configuration_is_the_best_mean_over_the_tuning_styles():
    """The demo runs what the committed cross-style sweep chose: the highest mean share of styled-and-correct samples
    over every tuning style (demo/results/compare-summary.json, written by `make compare`)."""
    with open(os.path.join(os.path.dirname(RECORD), "compare-summary.json")) as f:
        summary = json.load(f)
    assert summary["styles"] == list(world.TUNING_STYLES)
    complete = [e for e in summary["summary"] if e["styles"] == sorted(world.TUNING_STYLES)]
    best = max(complete, key=lambda e: e["styled_and_correct"])
    assert (best["method"], best["config"]) == (
        style_world.DEMO_METHOD,
        style_world.config_label(style_world.DEMO_CONFIG),
    )
