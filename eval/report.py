"""Tables (markdown + JSON) and pictures (side-by-side grid, win-rate bars) for eval.score and eval.style_alignment."""

import json
import os
import textwrap

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_json(path, payload):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def markdown_report(title, summaries, win_rates=None, descriptions=None):
    """summaries: {run label: {metric: {"mean", "std", "n"}}}; win_rates: {metric: win_rate() result}."""
    metrics = list(next(iter(summaries.values())))
    lines = [f"# {title}", "", "| run | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, summary in summaries.items():
        cells = [f"{summary[m]['mean']:.4f} ± {summary[m]['std']:.4f} (n={summary[m]['n']})" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if win_rates:
        lines += [
            "",
            "Per-prompt win rate of the model over the baseline (ties count one half), bootstrap 95% "
            "interval over prompts:",
            "",
            "| metric | win rate | 95% CI | wins / ties / losses |",
            "|---|---|---|---|",
        ]
        for metric, result in win_rates.items():
            lines.append(
                f"| {metric} | {result['win_rate']:.3f} | [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"
                f" | {result['wins']} / {result['ties']} / {result['losses']} |"
            )
    if descriptions:
        lines += ["", "Metrics:", ""] + [f"- `{m}`: {d}" for m, d in descriptions.items()]
    return "\n".join(lines) + "\n"


def win_rate_chart(path, win_rates, title):
    metrics = list(win_rates)
    rates = [win_rates[m]["win_rate"] for m in metrics]
    errors = [
        [r - win_rates[m]["ci_low"] for m, r in zip(metrics, rates)],
        [win_rates[m]["ci_high"] - r for m, r in zip(metrics, rates)],
    ]
    figure, axis = plt.subplots(figsize=(1.4 * len(metrics) + 2.5, 3.6))
    colors = [
        "tab:green" if win_rates[m]["ci_low"] > 0.5 else "tab:red" if win_rates[m]["ci_high"] < 0.5 else "tab:gray"
        for m in metrics
    ]
    axis.bar(metrics, rates, yerr=errors, capsize=6, color=colors)
    axis.axhline(0.5, color="black", linestyle="--", linewidth=1)
    axis.set_ylim(0, 1)
    axis.set_ylabel("win rate vs baseline")
    axis.set_title(title)
    for index, rate in enumerate(rates):
        axis.text(index, min(rate + 0.03, 0.95), f"{rate:.2f}", ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def comparison_grid(path, columns, row_labels, title=None):
    """columns: [(caption, [image per row])]; one column per prompt, one row per run (e.g. baseline, model)."""
    num_rows = len(row_labels)
    figure, axes = plt.subplots(
        num_rows, len(columns), figsize=(2.3 * len(columns), 2.5 * num_rows + 0.6), squeeze=False
    )
    for column, (caption, images) in enumerate(columns):
        for row, image in enumerate(images):
            axis = axes[row][column]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(row_labels[row], fontsize=10)
        axes[-1][column].set_xlabel("\n".join(textwrap.wrap(caption, 28)[:3]), fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path
