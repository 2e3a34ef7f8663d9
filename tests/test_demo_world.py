"""The style world's detectors, content classifier, tokenizer and preference data (demo/)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from demo import base, world


@pytest.mark.parametrize("style", sorted(world.STYLES))
def test_detector_separates_styled_from_plain_renderings(style):
    rng = np.random.default_rng(0)
    detector = world.STYLES[style]
    for scene in world.all_scenes():
        for _ in range(3):
            assert not detector.detect(world.render(scene, rng))
            assert detector.detect(world.render(scene, rng, style))
    # The other style is not mistaken for this one.
    for other in set(world.STYLES) - {style}:
        assert not any(detector.detect(world.render(s, rng, other)) for s in world.all_scenes())


@pytest.mark.parametrize("style", sorted(world.STYLES))
def test_detector_rejects_noise_and_blank_images(style):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(world.SIZE, world.SIZE, 3)).astype(np.uint8)
    blank = np.full((world.SIZE, world.SIZE, 3), 128, dtype=np.uint8)
    assert not world.STYLES[style].detect(noise) and not world.STYLES[style].detect(blank)


def test_content_classifier_reads_colour_and_position_of_every_scene():
    rng = np.random.default_rng(2)
    for scene in world.all_scenes():
        for style in (None, *world.STYLES):
            assert world.classify_content(world.render(scene, rng, style)) == (scene.colour, scene.position)
    assert world.classify_content(np.full((32, 32, 3), 190, dtype=np.uint8)) == (None, None)


def test_held_out_scenes_are_unseen_combinations_of_seen_parts():
    train, held_out = world.split_scenes()
    assert len(train) == 40 and len(held_out) == 8 and not set(train) & set(held_out)
    for attribute in ("colour", "shape", "position"):
        assert {getattr(s, attribute) for s in held_out} <= {getattr(s, attribute) for s in train}


def test_tokenizer_spells_every_caption_in_few_tokens(tmp_path):
    tokenizer = base.write_tokenizer(str(tmp_path))
    for scene in world.all_scenes():
        ids = tokenizer(scene.caption).input_ids
        assert len(ids) == len(scene.caption.split()) + 2  # one token per word, plus bos and eos
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == scene.caption


def test_preference_rows_put_the_styled_image_on_the_labelled_side():
    for row in base.preference_rows("frame", variants_per_scene=1, seed=0)[:10]:
        first = np.asarray(Image.open(io.BytesIO(row["jpg_0"])))
        second = np.asarray(Image.open(io.BytesIO(row["jpg_1"])))
        chosen, rejected = (first, second) if row["label_0"] == 1 else (second, first)
        assert world.STYLES["frame"].detect(chosen) and not world.STYLES["frame"].detect(rejected)
        assert world.classify_content(chosen) == world.classify_content(rejected)  # same content, same jitter


def empty_background(style):
    return style.apply(np.broadcast_to(world.BACKGROUND, (world.SIZE, world.SIZE, 3)).copy())


def test_every_texture_family_member_is_detected_by_its_own_detector_and_not_on_plain_scenes():
    rng = np.random.default_rng(3)
    scenes = world.all_scenes()
    for index in range(60):
        style = world.texture_style(f"member-{index}", world.random_texture(rng))
        for scene in [scenes[i] for i in rng.integers(0, len(scenes), size=3)]:
            assert style.detect(world.render(scene, rng, style)), style
            assert not style.detect(world.render(scene, rng)), style


def test_a_texture_in_the_wrong_place_is_not_the_style():
    """The detector scores the pattern inside its placement minus the same pattern outside it."""
    top = world.Texture("vertical", 6, "top", 0.5)
    everywhere = world.Texture("vertical", 6, "full", 0.5)
    bottom = world.Texture("vertical", 6, "bottom", 0.5)
    detector = world.texture_style("top", top)
    assert detector.detect(empty_background(top))
    assert not detector.detect(empty_background(everywhere)) and not detector.detect(empty_background(bottom))


def test_committed_autoencoder_reconstructs_texture_family_members_it_was_not_evaluated_on():
    """Round trips through the committed base's autoencoder keep each style's detector verdict: every named style,
    and random family members drawn with a seed the build never used."""
    from diffusers import AutoencoderKL

    from demo import style_world

    vae = AutoencoderKL.from_pretrained(os.path.join(style_world.ASSETS, "base"), subfolder="vae").eval()
    report = base.round_trip_report(vae, seed=2024, members=60)
    assert all(rate == 1.0 for rate in report["named_styles_detected_after_round_trip"].values()), report
    assert report["random_members_detected_after_round_trip"] >= 0.9, report
    assert report["plain_not_detected_after_round_trip"] == 1.0, report
    assert report["styled_round_trip_mse"] < 0.02, report


def test_hidden_reward_is_faithfulness_plus_area():
    rng = np.random.default_rng(4)
    scene = world.Scene("red", "square", "left")
    image = world.render(scene, rng)
    area = world.shape_area(image)
    assert 60 <= area <= 170
    assert world.hidden_reward(image, scene) == 1.0 + area / world.AREA_SCALE
    assert world.hidden_reward(image, world.Scene("blue", "square", "left")) == area / world.AREA_SCALE


def test_relative_preferences_are_two_base_samples_labelled_by_the_reward(monkeypatch):
    """With a vanishing Bradley-Terry temperature every label follows the reward's order, and pairs closer than the
    tie margin are ties; the two images differ (two seeds of the same caption)."""
    from demo import relative, style_world

    monkeypatch.setattr(relative, "REWARD_TEMPERATURE", 1e-9)
    rows = relative.preference_rows(style_world.ASSETS, seed=5, variants_per_scene=1)
    assert len(rows) == len(world.split_scenes()[0])
    margins = np.array([row["reward_0"] - row["reward_1"] for row in rows])
    labels = np.array([row["label_0"] for row in rows])
    assert np.array_equal(labels == 0.5, np.abs(margins) < relative.TIE_MARGIN)
    decided = labels != 0.5
    assert decided.sum() > len(rows) // 2
    assert np.array_equal(labels[decided] == 1.0, margins[decided] > 0)
    assert all(row["jpg_0"] != row["jpg_1"] for row in rows)
    assert {row["caption"] for row in rows} == {scene.caption for scene in world.split_scenes()[0]}
