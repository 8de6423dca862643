"""The demo's report: ``report.json``, ``report.md``, the PNGs, and the table printed at the end."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .._io import write_text_atomic

__all__ = ["format_table", "grouped_bars", "write_report"]

_ROWS = (("before", "em_before"), ("Neuro-RIT", "em_after"), ("baseline", "em_baseline"))
_ACCURACY = (("before", "accuracy_before"), ("Neuro-RIT", "accuracy_after"), ("baseline", "accuracy_baseline"))
_ABSTAINED = (("before", "abstained_before"), ("Neuro-RIT", "abstained_after"), ("baseline", "abstained_baseline"))


def format_table(report: dict) -> str:
    """Exact match and accuracy per condition before tuning, after Neuro-RIT and after the plain baseline; then the
    cost."""
    conditions = list(report["em_before"])
    lines = [f"{'EM on ' + str(report['questions']) + ' test questions':<34}" + "".join(f"{c:>12}" for c in conditions)]
    for label, key in _ROWS:
        lines.append(f"{label:<34}" + "".join(f"{report[key][c]:>12.3f}" for c in conditions))
    lines.append(f"{'accuracy (answer contained)':<34}" + "".join(f"{c:>12}" for c in conditions))
    for label, key in _ACCURACY:
        lines.append(f"{label:<34}" + "".join(f"{report[key][c]:>12.3f}" for c in conditions))
    lines.append(f"{'share answering unknown':<34}" + "".join(f"{c:>12}" for c in conditions))
    for label, key in _ABSTAINED:
        lines.append(f"{label:<34}" + "".join(f"{report[key][c]:>12.3f}" for c in conditions))
    lines.append(f"target layers {report['target_layers']}; deactivated neurons "
                 f"{sum(report['deactivated_per_layer'])}; trainable parameters {report['trainable_params']:,} "
                 f"(baseline {report['baseline_trainable_params']:,})")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report["seconds"].items())
    lines.append(f"time: {phases}")
    exported = report["export"]
    lines.append(f"export: {exported['same_answers']}/{exported['questions']} answers the same in plain transformers")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    conditions = list(report["em_before"])
    rows = ["| exact match (accuracy) | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for (label, key), (_, accuracy) in zip(_ROWS, _ACCURACY, strict=True):
        rows.append(f"| {label} | " + " | ".join(f"{report[key][c]:.3f} ({report[accuracy][c]:.3f})"
                                                  for c in conditions) + " |")
    abstained = ["| answered \"unknown\" | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for label, key in _ABSTAINED:
        abstained.append(f"| {label} | " + " | ".join(f"{report[key][c]:.3f}" for c in conditions) + " |")
    phases = ["| phase | seconds | peak RSS (MiB) |", "|---|---|---|"]
    for name, seconds in report["seconds"].items():
        peak = report["peak_memory_mib"].get(name)
        phases.append(f"| {name} | {seconds:.1f} | {'-' if peak is None else f'{peak:.0f}'} |")
    exported = report["export"]
    settings = report["settings"]
    return "\n".join([
        "# fastrit demo: Neuro-RIT on the embedded reader",
        "",
        f"Exact match on {report['questions']} held-out test questions, in brackets accuracy (a gold answer "
        "contained in the answer, what RAG robustness papers report; both SQuAD-normalised); k = 5 passages, noisy "
        "= one relevant among irrelevant ones. Neuro-RIT: the irrelevant-exclusive neurons deactivated, frozen "
        "layers in NF4, the "
        f"target layers' MLPs trained, {settings['steps']} steps of stage 1 (denoise) and of stage 2 (distill). "
        f"Baseline: the same layers' MLPs, nothing deactivated, {2 * settings['steps']} steps of answer-only "
        "targets on the same prompts. Answers after `Answer:` when a model writes it (stage 2 teaches evidence "
        "first), else the whole continuation.",
        "",
        *rows,
        "",
        "How often each model answered \"unknown\" (the reader was tuned to say so when no passage answers; right "
        "for irrelevant passages, a failure with the relevant one among them):",
        "",
        *abstained,
        "",
        f"- target layers: {report['target_layers']}; deactivated neurons per layer: "
        f"{report['deactivated_per_layer']}",
        f"- trainable parameters: {report['trainable_params']:,} (baseline {report['baseline_trainable_params']:,})",
        f"- export: {exported['same_answers']} of {exported['questions']} test answers identical when the export is "
        "loaded by plain transformers in a process without fastrit",
        "",
        *phases,
        "",
        "Plots: `em.png`, `neurons_per_layer.png`, `activation_shares.png`, `training_loss.png`.",
        "",
    ])


def grouped_bars(series: Mapping[str, Mapping[str, float]], path: Path, *, ylabel: str, title: str,
                 category_names: Mapping[str, str] | None = None) -> None:
    """A bar chart saved as a PNG at ``path``: one group per category (the first series' keys, in their order), one
    labelled bar per series in each group, y from 0 to 1.1 (scores that are shares). ``category_names``: x labels
    (default: the keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(next(iter(series.values())))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, [values[c] for c in categories], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(categories)), [(category_names or {}).get(c, c) for c in categories])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_em(report: dict, path: Path) -> None:
    conditions = list(report["em_before"])
    grouped_bars({label: report[key] for label, key in _ROWS}, path, ylabel="exact match",
                 title=f"Exact match on {report['questions']} test questions",
                 category_names={c: f"{c} passages" for c in conditions})


def _plot_losses(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    offset = 0
    for stage, points in report["training_loss"]["neuro-rit"].items():
        if points:
            ax.plot([offset + s for s, _ in points], [v for _, v in points], marker="o", label=f"Neuro-RIT {stage}")
            offset += points[-1][0]
    for stage, points in report["training_loss"]["baseline"].items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], linestyle="--", label=f"baseline ({stage})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean per target token)")
    ax.set_title("Training loss per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    """Write report.json, report.md, em.png and training_loss.png into ``out``; their paths."""
    paths = [out / "report.json", out / "report.md", out / "em.png", out / "training_loss.png"]
    write_text_atomic(paths[0], json.dumps(report, indent=1) + "\n")
    write_text_atomic(paths[1], _markdown(report))
    _plot_em(report, paths[2])
    _plot_losses(report, paths[3])
    return paths
