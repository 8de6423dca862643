"""Pictures of NeuronSets: neurons per layer in each set (target layers marked), and activation shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._io import atomic_path
from .stats import MINED_CONDITIONS

if TYPE_CHECKING:
    from .sets import NeuronSets

__all__ = ["plot_neuron_sets"]

_SET_STYLE = {  # name: (label, colour)
    "relevant": ("relevant", "#4c72b0"),
    "irrelevant": ("irrelevant", "#dd8452"),
    "relevant_exclusive": ("relevant only", "#55a868"),
    "irrelevant_exclusive": ("irrelevant only", "#c44e52"),
}
_CONDITION_COLOUR = {"relevant": "#4c72b0", "irrelevant": "#dd8452"}


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def _selection_text(sets: NeuronSets) -> str:
    s = sets.settings
    rule = f"top {s['top_n']} per layer" if s.get("top_n") else f"active in >= {s.get('share', 0.3):.0%} of examples"
    return f"{rule}; active = IG score >= {s.get('threshold', 0.2):g} x the layer's max"


def neurons_per_layer_figure(sets: NeuronSets) -> Figure:
    """Grouped bars: the size of each set in each layer; target layers shaded and starred."""
    figure = Figure(figsize=(max(6.0, 0.55 * sets.num_layers + 3), 4.2))
    axes = figure.add_subplot()
    sizes = sets.set_sizes()
    layers = np.arange(sets.num_layers)
    width = 0.8 / len(_SET_STYLE)
    for j, (name, (label, colour)) in enumerate(_SET_STYLE.items()):
        axes.bar(layers + (j - 1.5) * width, sizes[name], width, label=label, color=colour)
    for rank, layer in enumerate(sets.target_layers):
        axes.axvspan(layer - 0.45, layer + 0.45, color="#f2d94e", alpha=0.25, zorder=0,
                     label="target layer" if rank == 0 else None)
    axes.set_xticks(layers, [f"{layer}*" if layer in sets.target_layers else str(layer) for layer in layers])
    axes.set_xlabel("layer (* = target layer to tune)")
    axes.set_ylabel("neurons in the set")
    examples = ", ".join(f"{n} {c}" for c, n in sets.examples.items())
    axes.set_title(f"Mined neurons per layer ({examples} examples)\n{_selection_text(sets)}", fontsize=10)
    axes.legend(fontsize=8, ncols=2)
    axes.grid(axis="y", alpha=0.3)
    return figure


def activation_shares_figure(sets: NeuronSets) -> Figure:
    """Histograms of the share of examples in which each neuron was active, per condition (active neurons only);
    the share a neuron needs to join a set is marked."""
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    bins = np.linspace(0, 1, 41)
    for condition in MINED_CONDITIONS:
        shares = sets.shares(condition)
        values = shares[shares > 0].numpy()
        axes.hist(values, bins=bins, histtype="step", linewidth=1.6, color=_CONDITION_COLOUR[condition],
                  label=f"{condition} contexts ({values.size} neurons ever active)")
    if not sets.settings.get("top_n"):
        axes.axvline(sets.settings.get("share", 0.3), color="black", linestyle="--", linewidth=1,
                     label="share needed to join a set")
    axes.set_yscale("log")
    axes.set_xlabel("share of the condition's examples in which the neuron is active")
    axes.set_ylabel("neurons (log scale)")
    axes.set_title(f"How often neurons are active, all {sets.num_layers} layers", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def plot_neuron_sets(sets: NeuronSets, path_or_dir: str | os.PathLike) -> list[Path]:
    """Write ``neurons_per_layer.png`` and ``activation_shares.png`` into a folder, or, given a path ending in
    ``.png``, beside it as ``<stem>-neurons_per_layer.png`` and ``<stem>-activation_shares.png``."""
    target = Path(path_or_dir)
    if target.suffix.lower() == ".png":
        folder, prefix = target.parent, f"{target.stem}-"
    else:
        folder, prefix = target, ""
    return [
        _save(neurons_per_layer_figure(sets), folder / f"{prefix}neurons_per_layer.png"),
        _save(activation_shares_figure(sets), folder / f"{prefix}activation_shares.png"),
    ]
