"""eval.relabel on the tiny Pick-a-Pic-schema dataset: AI labels and scores against scores computed directly with
eval.scorers, ties by margin, weighted sums, resume, the agreement summary, bad inputs, and training on the result."""

import io
import json
import logging
import os

import datasets
import numpy as np
import pytest
import tiny
from helpers import SD15, weight_flags
from PIL import Image

from eval import relabel, scorers
from eval.stats import win_rate


NUM_ROWS = 18  # the rows of the pickapic_path fixture: tiny.pickapic_rows(18), human labels cycling 1, 0, 0.5
HUMAN_DECIDED = 12


@pytest.fixture(scope="module")
def rows():
    return tiny.pickapic_rows(NUM_ROWS)


@pytest.fixture(scope="module")
def direct_scores(rows, scorer_weights):
    """{scorer: (scores of image 0, scores of image 1)}, computed on the rows' images through eval.scorers."""
    images = [[Image.open(io.BytesIO(row[column])).convert("RGB") for row in rows] for column in ("jpg_0", "jpg_1")]
    captions = [row["caption"] for row in rows]
    return {
        name: tuple(np.array(scorers.load_scorer(name, scorer_weights).score(side, captions)) for side in images)
        for name in ("pickscore", "aesthetic")
    }


def expected_labels(score_0, score_1, margin=0.0):
    return np.where(score_0 - score_1 > margin, 1.0, np.where(score_1 - score_0 > margin, 0.0, 0.5))


def margin_between(differences):
    """A tie margin in the widest gap between the middle |score differences| (float noise cannot move a row)."""
    gaps = np.sort(np.abs(differences))
    index = 4 + int(np.argmax(np.diff(gaps[4:-4])))
    assert gaps[index + 1] - gaps[index] > 1e-3
    return float((gaps[index] + gaps[index + 1]) / 2)


def run_relabel(scorer_weights, dataset, out, *extra):
    return relabel.main(
        [
            "--dataset_name",
            str(dataset),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch_size",
            "4",
            "--shard_size",
            "5",
            *weight_flags(scorer_weights),
            *extra,
        ]
    )


def load_output(out):
    return datasets.load_dataset(str(out), split="train")


def shard_bytes(out):
    folder = os.path.join(out, "data")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def pickscore_run(pickapic_path, scorer_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("relabel-pickscore")
    return out, run_relabel(scorer_weights, pickapic_path, out, "--scorers", "pickscore")


def test_labels_and_scores_equal_the_scorer_applied_directly(pickscore_run, rows, direct_scores):
    out, summary = pickscore_run
    relabelled = load_output(out)
    score_0, score_1 = direct_scores["pickscore"]
    np.testing.assert_allclose(relabelled["score_0"], score_0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(relabelled["score_1"], score_1, rtol=1e-5, atol=1e-5)
    labels = expected_labels(score_0, score_1)
    assert relabelled["label_0"] == labels.tolist() and relabelled["label_1"] == (1 - labels).tolist()
    assert relabelled["human_label_0"] == [row["label_0"] for row in rows]
    assert relabelled["human_label_1"] == [row["label_1"] for row in rows]
    for column in set(rows[0]) - {"label_0", "label_1"}:  # every other column, the image bytes included, untouched
        assert relabelled[column] == [row[column] for row in rows], column
    assert not any(relabelled["undecodable"])
    assert not [name for name in relabelled.column_names if name.startswith("score_0_")]  # one scorer: no split
    assert len(os.listdir(out / "data")) == 4  # 18 rows in shards of 5
    assert summary["rows"] == NUM_ROWS and summary["ties"] == 0 and summary["pairs_for_training"] == NUM_ROWS
    assert summary["image_0_preferred"] == int((labels == 1).sum())
    assert json.loads((out / "summary.json").read_text()) == summary


def test_rows_within_the_tie_margin_become_ties(pickapic_path, scorer_weights, direct_scores, tmp_path):
    score_0, score_1 = direct_scores["pickscore"]
    margin = margin_between(score_0 - score_1)
    labels = expected_labels(score_0, score_1, margin)
    ties = int((labels == 0.5).sum())
    assert 0 < ties < NUM_ROWS
    summary = run_relabel(
        scorer_weights, pickapic_path, tmp_path, "--scorers", "pickscore", "--tie_margin", str(margin)
    )
    relabelled = load_output(tmp_path)
    assert relabelled["label_0"] == labels.tolist()
    assert relabelled["label_1"] == np.where(labels == 0.5, 0.5, 1 - labels).tolist()
    assert summary["ties"] == ties and summary["pairs_for_training"] == NUM_ROWS - ties


def test_a_weighted_sum_of_two_scorers_is_the_weighted_sum_of_their_scores(
    pickapic_path, scorer_weights, direct_scores, tmp_path
):
    summary = run_relabel(scorer_weights, pickapic_path, tmp_path, "--scorers", "pickscore:1.0,aesthetic:4")
    relabelled = load_output(tmp_path)
    pick, aesthetic = direct_scores["pickscore"], direct_scores["aesthetic"]
    combined = [1.0 * pick[side] + 4.0 * aesthetic[side] for side in (0, 1)]
    for side in (0, 1):
        np.testing.assert_allclose(relabelled[f"score_{side}"], combined[side], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(relabelled[f"score_{side}_pickscore"], pick[side], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(relabelled[f"score_{side}_aesthetic"], aesthetic[side], rtol=1e-5, atol=1e-5)
    labels = expected_labels(*combined)
    assert relabelled["label_0"] == labels.tolist()
    # The sum decides rows against each scorer alone (the test would not tell a sum from one scorer otherwise).
    assert (labels != expected_labels(*pick)).any() and (labels != expected_labels(*aesthetic)).any()
    assert summary["scorers"]["aesthetic"]["weight"] == 4.0


def test_an_interrupted_run_resumes_to_the_same_output(pickapic_path, scorer_weights, tmp_path, monkeypatch):
    flags = ["--scorers", "pickscore:1,aesthetic:0.5", "--tie_margin", "0.2"]
    straight = run_relabel(scorer_weights, pickapic_path, tmp_path / "straight", *flags)
    write_shard, written = relabel.write_shard, []

    def interrupted_during_the_second_shard(shard, path):
        if written:
            with open(relabel.partial_path(path), "wb") as f:
                f.write(b"PAR1 torn")
            raise KeyboardInterrupt
        written.append(path)
        write_shard(shard, path)

    monkeypatch.setattr(relabel, "write_shard", interrupted_during_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_relabel(scorer_weights, pickapic_path, tmp_path / "split", *flags)
    assert list(shard_bytes(tmp_path / "split")) == [".train-00001.parquet.partial", "train-00000.parquet"]
    assert len(load_output(tmp_path / "split")) == 5  # loadable meanwhile: the torn file is hidden

    written.clear()
    monkeypatch.setattr(relabel, "write_shard", lambda shard, path: written.append(path) or write_shard(shard, path))
    resumed = run_relabel(scorer_weights, pickapic_path, tmp_path / "split", *flags)
    assert [os.path.basename(path) for path in written] == [f"train-0000{i}.parquet" for i in (1, 2, 3)]
    assert shard_bytes(tmp_path / "split") == shard_bytes(tmp_path / "straight")
    assert resumed == straight
    for name in ("summary.json", "settings.json"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_resuming_with_other_settings_is_refused(pickscore_run, pickapic_path, scorer_weights, monkeypatch):
    out, summary = pickscore_run
    with pytest.raises(ValueError, match=r"other settings \(tie_margin: 0.0 -> 0.5\)"):
        run_relabel(scorer_weights, pickapic_path, out, "--scorers", "pickscore", "--tie_margin", "0.5")
    with pytest.raises(ValueError, match=r"scorers: \{'pickscore': 1.0\} -> \{'pickscore': 1.0, 'aesthetic': 1.0\}"):
        run_relabel(scorer_weights, pickapic_path, out, "--scorers", "pickscore,aesthetic")
    with pytest.raises(ValueError, match="pickscore_model"):
        run_relabel(
            {**scorer_weights, "pickscore_model": scorer_weights["hpsv2_tokenizer"]},
            pickapic_path,
            out,
            "--scorers",
            "pickscore",
        )
    # A runtime flag may change: the finished run is only summarized again.
    monkeypatch.setattr(relabel, "write_shard", lambda shard, path: pytest.fail("rewrote a completed shard"))
    assert run_relabel(scorer_weights, pickapic_path, out, "--scorers", "pickscore", "--batch_size", "3") == summary


@SD15
def test_the_relabelled_dataset_loads_and_trains(
    pickapic_path, scorer_weights, direct_scores, train, tmp_path, caplog
):
    score_0, score_1 = direct_scores["pickscore"]
    summary = run_relabel(
        scorer_weights,
        pickapic_path,
        tmp_path / "relabelled",
        "--scorers",
        "pickscore",
        "--tie_margin",
        str(margin_between(score_0 - score_1)),
    )
    assert len(load_output(tmp_path / "relabelled")) == NUM_ROWS and 0 < summary["ties"] < NUM_ROWS
    with caplog.at_level(logging.INFO):
        progress, _ = train(
            "--max_train_steps", "1", "--validation_prompts", output_dir="train", dataset=str(tmp_path / "relabelled")
        )
    assert progress.global_step == 1
    pairs = NUM_ROWS - summary["ties"]
    assert summary["pairs_for_training"] == pairs
    assert f"Dataset: {NUM_ROWS} rows, {summary['ties']} ties dropped, {pairs} pairs used." in caplog.text


def test_the_agreement_summary_equals_a_direct_count(pickapic_path, scorer_weights, direct_scores, tmp_path):
    score_0, score_1 = direct_scores["aesthetic"]
    summary = run_relabel(
        scorer_weights,
        pickapic_path,
        tmp_path,
        "--scorers",
        "aesthetic",
        "--tie_margin",
        str(margin_between(score_0 - score_1)),
    )
    relabelled = load_output(tmp_path)
    pairs = [(ai, human) for ai, human in zip(relabelled["label_0"], relabelled["human_label_0"]) if human != 0.5]
    agree = sum(ai == human for ai, human in pairs)
    ai_ties = sum(ai == 0.5 for ai, _ in pairs)
    agreement = summary["agreement"]
    assert len(pairs) == HUMAN_DECIDED and ai_ties > 0  # the margin ties some rows the humans decided
    assert (agreement["n"], agreement["agree"], agreement["ai_ties"]) == (HUMAN_DECIDED, agree, ai_ties)
    assert agreement["disagree"] == HUMAN_DECIDED - agree - ai_ties
    assert agreement["rate"] == pytest.approx((agree + 0.5 * ai_ties) / HUMAN_DECIDED)
    assert agreement["ci_low"] <= agreement["rate"] <= agreement["ci_high"]
    assert summary["human_ties"] == NUM_ROWS - HUMAN_DECIDED
    # The interval is eval.stats' bootstrap over rows: the same as win_rate's up to resampling noise.
    outcomes = {index: 1.0 if ai == human else 0.5 if ai == 0.5 else 0.0 for index, (ai, human) in enumerate(pairs)}
    reference = win_rate(outcomes, dict.fromkeys(outcomes, 0.5))
    assert abs(agreement["ci_low"] - reference["ci_low"]) <= 1.5 / HUMAN_DECIDED
    assert abs(agreement["ci_high"] - reference["ci_high"]) <= 1.5 / HUMAN_DECIDED


def test_undecodable_rows_are_kept_as_flagged_ties(rows, scorer_weights, direct_scores, tmp_path, caplog):
    broken = [1, 4, 7]
    dataset = tiny.write_pickapic_dataset(str(tmp_path / "corrupt"), tiny.corrupt_rows(rows, broken))
    summary = run_relabel(scorer_weights, dataset, tmp_path / "out", "--scorers", "pickscore")
    relabelled = load_output(tmp_path / "out")
    assert [i for i, bad in enumerate(relabelled["undecodable"]) if bad] == broken
    assert all(relabelled["label_0"][i] == relabelled["label_1"][i] == 0.5 for i in broken)
    assert all(relabelled["score_0"][i] is None and relabelled["score_1"][i] is None for i in broken)
    kept = [i for i in range(NUM_ROWS) if i not in broken]
    score_0, score_1 = direct_scores["pickscore"]
    assert [relabelled["label_0"][i] for i in kept] == expected_labels(score_0[kept], score_1[kept]).tolist()
    assert summary["undecodable"] == 3 and summary["ties"] == 3
    assert summary["agreement"]["n"] == sum(rows[i]["label_0"] != 0.5 for i in kept)  # broken rows not compared
    assert all(f"Row {i}: cannot decode" in caplog.text for i in broken)


def test_wrong_image_columns_stop_the_run(pickapic_path, scorer_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(relabel, "MAX_CONSECUTIVE_UNDECODABLE", 3)
    with pytest.raises(ValueError, match="4 rows in a row .* --image_0_column/--image_1_column"):
        run_relabel(
            scorer_weights,
            pickapic_path,
            tmp_path,
            "--scorers",
            "pickscore",
            "--image_0_column",
            "image_0_url",
            "--image_1_column",
            "image_1_url",
        )


@pytest.mark.parametrize("flag", ["--caption_column", "--image_0_column", "--image_1_column", "--label_0_column"])
def test_a_missing_column_names_its_flag(pickapic_path, scorer_weights, tmp_path, flag):
    with pytest.raises(ValueError, match=f"no column 'nope'.*pass {flag} <name>"):
        run_relabel(scorer_weights, pickapic_path, tmp_path, "--scorers", "pickscore", flag, "nope")


def test_a_failed_start_does_not_bind_the_folder(pickapic_path, scorer_weights, tmp_path):
    with pytest.raises(ValueError, match="--caption_column"):
        run_relabel(scorer_weights, pickapic_path, tmp_path, "--scorers", "pickscore", "--caption_column", "prompt")
    assert run_relabel(scorer_weights, pickapic_path, tmp_path, "--scorers", "pickscore")["rows"] == NUM_ROWS


@pytest.mark.parametrize(
    "text,message",
    [
        ("pickscore,fid", r"Unknown metric\(s\) \['fid'\]"),
        ("pickscore:abc", "the weight of pickscore must be a positive number, not 'abc'"),
        ("pickscore:1,aesthetic:-0.5", "the weight of aesthetic must be a positive number, not '-0.5'"),
        ("aesthetic:0", "the weight of aesthetic must be a positive number"),
        ("pickscore:nan", "the weight of pickscore must be a positive number"),
        ("pickscore:1,pickscore:2", r"names \['pickscore'\] more than once"),
    ],
)
def test_unknown_scorers_and_bad_weights_fail_before_anything_loads(tmp_path, text, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        relabel.main(["--dataset_name", str(tmp_path / "no-such-dataset"), "--out", str(out), "--scorers", text])
    assert not out.exists()


def test_streaming_and_save_to_disk_inputs_give_the_same_rows(
    pickscore_run, pickapic_path, rows, scorer_weights, tmp_path
):
    out, summary = pickscore_run
    expected = load_output(out).to_dict()
    assert (
        run_relabel(scorer_weights, pickapic_path, tmp_path / "streamed", "--scorers", "pickscore", "--streaming")
        == summary
    )
    assert load_output(tmp_path / "streamed").to_dict() == expected

    for name, streaming in (("first", []), ("first-streamed", ["--streaming"])):
        first = run_relabel(
            scorer_weights, pickapic_path, tmp_path / name, "--scorers", "pickscore", "--max_rows", "7", *streaming
        )
        assert first["rows"] == 7 and first["shards"] == 2
        got = load_output(tmp_path / name).to_dict()
        for column in ("score_0", "score_1"):  # row 5 and 6 are scored in a smaller batch: float noise only
            np.testing.assert_allclose(got.pop(column), expected[column][:7], rtol=1e-5, atol=1e-5)
        assert got == {column: values[:7] for column, values in expected.items() if column in got}

    on_disk = (
        datasets.Dataset.from_list(rows).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    )
    on_disk.save_to_disk(str(tmp_path / "disk"))
    # (a save_to_disk folder is read in place, --streaming or not)
    run_relabel(scorer_weights, tmp_path / "disk", tmp_path / "from-disk", "--scorers", "pickscore", "--streaming")
    relabelled = load_output(tmp_path / "from-disk")
    assert isinstance(relabelled.features["jpg_0"], datasets.Image)  # the Image feature kept, the bytes untouched
    undecoded = relabelled.cast_column("jpg_0", datasets.Image(decode=False))
    assert [image["bytes"] for image in undecoded["jpg_0"]] == [row["jpg_0"] for row in rows]
    assert relabelled["label_0"] == expected["label_0"] and relabelled["score_0"] == expected["score_0"]


def test_relabelling_a_relabelled_dataset_keeps_the_human_labels(
    pickscore_run, rows, scorer_weights, direct_scores, tmp_path
):
    out, _ = pickscore_run
    summary = run_relabel(scorer_weights, out, tmp_path, "--scorers", "aesthetic")
    relabelled = load_output(tmp_path)
    assert relabelled["human_label_0"] == [row["label_0"] for row in rows]
    assert relabelled.column_names.count("score_0") == 1
    np.testing.assert_allclose(relabelled["score_0"], direct_scores["aesthetic"][0], rtol=1e-5, atol=1e-5)
    assert summary["agreement"]["n"] == HUMAN_DECIDED
