"""Win rates and bootstrap intervals on hand-made score tables with known answers."""

import pytest

from eval.stats import per_prompt_means, summarize, win_rate


def test_all_wins_all_losses_and_ties():
    baseline = dict.fromkeys(range(10), 0.0)
    wins = win_rate(dict.fromkeys(range(10), 1.0), baseline)
    assert (wins["win_rate"], wins["ci_low"], wins["ci_high"], wins["wins"]) == (1.0, 1.0, 1.0, 10)
    losses = win_rate(dict.fromkeys(range(10), -1.0), baseline)
    assert (losses["win_rate"], losses["ci_high"], losses["losses"]) == (0.0, 0.0, 10)
    ties = win_rate(dict(baseline), baseline)
    assert (ties["win_rate"], ties["ties"], ties["ci_low"], ties["ci_high"]) == (0.5, 10, 0.5, 0.5)


def test_mixed_outcomes_count_ties_as_half():
    model = {0: 2.0, 1: 2.0, 2: 2.0, 3: 0.0, 4: 1.0}
    baseline = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    result = win_rate(model, baseline)
    assert result["win_rate"] == pytest.approx((3 + 0.5) / 5)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (3, 1, 1, 5)


def test_bootstrap_interval_matches_the_binomial_standard_error():
    # 100 prompts, 60 wins: the percentile interval is about 0.6 +- 1.96 * sqrt(0.6 * 0.4 / 100) = [0.504, 0.696].
    model = {i: 1.0 if i < 60 else -1.0 for i in range(100)}
    result = win_rate(model, dict.fromkeys(range(100), 0.0), samples=4000, seed=1)
    assert result["win_rate"] == 0.6
    assert result["ci_low"] == pytest.approx(0.504, abs=0.02)
    assert result["ci_high"] == pytest.approx(0.696, abs=0.02)
    assert win_rate(model, dict.fromkeys(range(100), 0.0), samples=4000, seed=1) == result  # seeded


def test_per_prompt_means_average_the_seeds_of_a_prompt():
    rows = [{"prompt_index": 0, "m": 1.0}, {"prompt_index": 0, "m": 3.0}, {"prompt_index": 1, "m": 5.0}]
    assert per_prompt_means(rows, "m") == {0: 2.0, 1: 5.0}


def test_different_prompt_sets_are_refused():
    with pytest.raises(ValueError, match="different prompts"):
        win_rate({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0})


def test_summary_uses_the_sample_standard_deviation():
    assert summarize([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": pytest.approx(1.2909944), "n": 4}
