"""The style world's detectors, content classifier, tokenizer and preference data (demo/)."""

import io

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
