"""Summaries and per-prompt win rates with a bootstrap 95% interval (prompts resampled with replacement)."""

import numpy as np


def summarize(values):
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "n": int(len(values)),
    }


def per_prompt_means(rows, metric):
    """{prompt_index: mean score over that prompt's images}."""
    groups = {}
    for row in rows:
        groups.setdefault(int(row["prompt_index"]), []).append(float(row[metric]))
    return {index: float(np.mean(scores)) for index, scores in groups.items()}


def win_rate(model_scores, baseline_scores, samples=2000, seed=0):
    """Share of prompts where the model's mean score beats the baseline's (a tie counts one half), with a
    percentile bootstrap 95% interval over prompts. Both dicts map prompt index -> score and must share keys."""
    if set(model_scores) != set(baseline_scores):
        only = sorted(set(model_scores) ^ set(baseline_scores))[:5]
        raise ValueError(
            f"Model and baseline were scored on different prompts (e.g. prompt indices {only}); "
            "generate both with the same --prompts and --seed."
        )
    if not model_scores:
        raise ValueError("No prompts to compare.")
    keys = sorted(model_scores)
    difference = np.array([model_scores[k] - baseline_scores[k] for k in keys])
    outcomes = np.where(difference > 0, 1.0, np.where(difference < 0, 0.0, 0.5))
    resampled = np.random.default_rng(seed).integers(0, len(outcomes), size=(samples, len(outcomes)))
    low, high = np.percentile(outcomes[resampled].mean(axis=1), [2.5, 97.5])
    return {
        "win_rate": float(outcomes.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "wins": int((outcomes == 1).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0).sum()),
        "n": int(len(outcomes)),
        "bootstrap_samples": int(samples),
    }
