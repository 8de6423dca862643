"""NeuronSets: the mined neurons of every layer, the statistics they come from, and the layers to tune."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import _args
from .._io import atomic_path, write_text_atomic
from .stats import MINED_CONDITIONS, MiningStats

__all__ = ["SET_NAMES", "NeuronSets", "SETS_FILE", "SUMMARY_FILE"]

SET_NAMES = ("relevant", "irrelevant", "relevant_exclusive", "irrelevant_exclusive")
SETS_FILE = "neuron_sets.safetensors"
SUMMARY_FILE = "summary.json"
_FORMAT = "fastrit.NeuronSets/1"
_UNSET = object()


def check_selection(share: float, top_n: int | None, target_layers: int, num_layers: int | None) -> None:
    """Raise ValueError naming the selection argument out of range (``num_layers`` None: no upper bound)."""
    _args.number("share", share, low=0, high=1)
    _args.positive("top_n", top_n, optional=True)
    upper = "the number of layers" if num_layers is None else num_layers
    _args.integer("target_layers", target_layers, low=0, high=None if num_layers is None else num_layers + 1,
                  what=f"an integer in [0, {upper}]")


def _condition_set(counts: torch.Tensor, examples: int, share: float, top_n: int | None) -> torch.Tensor:
    """``[L, I]`` bool: neurons active in at least ``share`` of the examples, or the ``top_n`` most often active
    per layer (ties to the lower index); never a neuron that was not active at all."""
    if top_n is None:
        return (counts > 0) & (counts.double() >= share * examples)
    order = torch.sort(counts, dim=1, descending=True, stable=True).indices[:, :top_n]
    mask = torch.zeros_like(counts, dtype=torch.bool).scatter_(1, order, True)
    return mask & (counts > 0)


@dataclass(eq=False)
class NeuronSets:
    """Neurons of every MLP layer that respond to relevant and to irrelevant retrieved passages.

    Attributes:
        counts: per condition ("relevant", "irrelevant"), ``[L, I]`` int64: in how many examples each neuron was
            active (IG score >= ``threshold`` x the example's largest score in that layer, and positive).
        mean_scores: per condition, ``[L, I]`` float32: each neuron's IG score averaged over the examples.
        examples: per condition, the number of examples (records with a prompt of that condition).
        skipped: per condition, the records without a prompt of that condition, by reason.
        masks: per set name (:data:`SET_NAMES`), ``[L, I]`` bool membership.
        target_layers: the layers to tune, the most relevant-exclusive neurons first.
        settings: how the statistics were made and the sets selected (JSON values).
        model: the model's identity and shape (model_type, num_layers, intermediate_size, config and weight
            hashes).

    The sets per layer, as sorted int64 index tensors: :attr:`relevant`, :attr:`irrelevant`,
    :attr:`relevant_exclusive`, :attr:`irrelevant_exclusive` (each ``{layer: indices}``).
    """

    counts: dict[str, torch.Tensor]
    mean_scores: dict[str, torch.Tensor]
    examples: dict[str, int]
    skipped: dict[str, dict[str, int]]
    masks: dict[str, torch.Tensor]
    target_layers: list[int]
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    # construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_stats(cls, stats: MiningStats, *, share: float, top_n: int | None, target_layers: int,
                   settings: dict, model: dict) -> NeuronSets:
        """The sets selected from summed statistics (see :meth:`select` for the rule)."""
        counts, means, examples, skipped = {}, {}, {}, {}
        for condition in MINED_CONDITIONS:
            s = stats.conditions[condition]
            counts[condition] = s.counts.clone()
            means[condition] = (s.score_sums / max(s.examples, 1)).float()
            examples[condition] = s.examples
            skipped[condition] = dict(sorted(s.skipped.items()))
        empty = torch.zeros_like(counts["relevant"], dtype=torch.bool)
        base = cls(counts, means, examples, skipped, dict.fromkeys(SET_NAMES, empty), [], dict(settings), dict(model))
        return base.select(share=share, top_n=top_n, target_layers=target_layers)

    def select(self, *, share: float | None = None, top_n: int | None | object = _UNSET,
               target_layers: int | None = None) -> NeuronSets:
        """A copy with the sets chosen again from the same statistics (arguments left out keep their setting).

        A neuron belongs to a condition's set when active in at least ``share`` of that condition's examples,
        or, with ``top_n``, when it is among the ``top_n`` of its layer most often active (never when it was
        not active at all). Exclusive sets: relevant minus irrelevant, irrelevant minus relevant. Layers are
        ranked by their number of relevant-exclusive neurons (ties: the lower layer first); the first
        ``target_layers`` are the layers to tune.
        """
        share = self.settings.get("share", 0.3) if share is None else share
        top_n = self.settings.get("top_n") if top_n is _UNSET else top_n
        target_layers = self.settings.get("target_layers", 3) if target_layers is None else target_layers
        check_selection(share, top_n, target_layers, self.num_layers)
        relevant = _condition_set(self.counts["relevant"], self.examples["relevant"], share, top_n)
        irrelevant = _condition_set(self.counts["irrelevant"], self.examples["irrelevant"], share, top_n)
        masks = {"relevant": relevant, "irrelevant": irrelevant,
                 "relevant_exclusive": relevant & ~irrelevant, "irrelevant_exclusive": irrelevant & ~relevant}
        per_layer = masks["relevant_exclusive"].sum(dim=1).tolist()
        ranked = sorted(range(self.num_layers), key=lambda layer: (-per_layer[layer], layer))
        settings = {**self.settings, "share": float(share), "top_n": top_n, "target_layers": target_layers}
        return replace(self, masks=masks, target_layers=ranked[:target_layers], settings=settings)

    # views --------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return int(self.counts["relevant"].shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.counts["relevant"].shape[1])

    def indices(self, name: str) -> dict[int, torch.Tensor]:
        """``{layer: sorted int64 neuron indices}`` of set ``name`` (one of :data:`SET_NAMES`), every layer."""
        _args.one_of("name", name, SET_NAMES)
        return {layer: torch.nonzero(row).flatten() for layer, row in enumerate(self.masks[name])}

    @property
    def relevant(self) -> dict[int, torch.Tensor]:
        return self.indices("relevant")

    @property
    def irrelevant(self) -> dict[int, torch.Tensor]:
        return self.indices("irrelevant")

    @property
    def relevant_exclusive(self) -> dict[int, torch.Tensor]:
        return self.indices("relevant_exclusive")

    @property
    def irrelevant_exclusive(self) -> dict[int, torch.Tensor]:
        return self.indices("irrelevant_exclusive")

    def shares(self, condition: str) -> torch.Tensor:
        """``[L, I]`` float64: the share of ``condition``'s examples in which each neuron was active."""
        return self.counts[condition].double() / max(self.examples[condition], 1)

    def set_sizes(self) -> dict[str, list[int]]:
        """Per set name, the number of neurons in each layer."""
        return {name: mask.sum(dim=1).tolist() for name, mask in self.masks.items()}

    def summary(self) -> dict:
        """What summary.json holds: sizes per layer, target layers, examples, skips, settings, model."""
        return {"format": _FORMAT, "neurons_per_layer": self.set_sizes(), "target_layers": self.target_layers,
                "examples": self.examples, "skipped": self.skipped, "settings": self.settings, "model": self.model}

    def __eq__(self, other: object) -> bool:
        """Equal statistics, sets and settings, bit for bit."""
        if not isinstance(other, NeuronSets):
            return NotImplemented
        tensors_equal = all(
            torch.equal(getattr(self, name)[key], getattr(other, name)[key])
            for name in ("counts", "mean_scores", "masks") for key in getattr(self, name)
        )
        return (tensors_equal and self.examples == other.examples and self.skipped == other.skipped
                and self.target_layers == other.target_layers and self.settings == other.settings
                and self.model == other.model)

    def __repr__(self) -> str:
        sizes = {name: sum(layer) for name, layer in self.set_sizes().items()}
        return (f"NeuronSets(layers={self.num_layers}, intermediate_size={self.intermediate_size}, "
                f"examples={self.examples}, sizes={sizes}, target_layers={self.target_layers})")

    # files --------------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``neuron_sets.safetensors`` (everything) and ``summary.json`` (for people) into ``directory``,
        each atomically; the safetensors file is written last, so a directory holding it is complete."""
        directory = Path(directory)
        write_text_atomic(directory / SUMMARY_FILE, json.dumps(self.summary(), indent=2) + "\n")
        tensors = {}
        for condition in MINED_CONDITIONS:
            tensors[f"{condition}.counts"] = self.counts[condition].contiguous()
            tensors[f"{condition}.mean_scores"] = self.mean_scores[condition].contiguous()
        for name in SET_NAMES:
            tensors[f"{name}.mask"] = self.masks[name].contiguous()
        meta = {"format": _FORMAT, "examples": self.examples, "skipped": self.skipped,
                "target_layers": self.target_layers, "settings": self.settings, "model": self.model}
        with atomic_path(directory / SETS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={key: json.dumps(value) for key, value in meta.items()})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NeuronSets:
        """Read what :meth:`save` wrote into ``directory``."""
        path = Path(directory) / SETS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"directory: no {SETS_FILE} in {str(directory)!r}")
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            if json.loads(raw.get("format", "null")) != _FORMAT:
                raise ValueError(f"directory: {path} is not a fastrit NeuronSets file")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        meta = {key: json.loads(value) for key, value in raw.items()}
        return cls(
            counts={c: tensors[f"{c}.counts"] for c in MINED_CONDITIONS},
            mean_scores={c: tensors[f"{c}.mean_scores"] for c in MINED_CONDITIONS},
            examples={c: int(n) for c, n in meta["examples"].items()},
            skipped=meta["skipped"],
            masks={name: tensors[f"{name}.mask"] for name in SET_NAMES},
            target_layers=[int(layer) for layer in meta["target_layers"]],
            settings=meta["settings"],
            model=meta["model"],
        )

    def plot(self, path_or_dir: str | os.PathLike) -> list[Path]:
        """Write the PNGs of :func:`fastrit.mining.plot.plot_neuron_sets` and return their paths."""
        from .plot import plot_neuron_sets

        return plot_neuron_sets(self, path_or_dir)
