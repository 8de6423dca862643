"""Mining statistics: which neurons are active in an example, and their counts and score sums over examples.

Every sum here is taken in a fixed order (examples in record order within a chunk, chunks in index order), and
counts are integers, so the totals do not depend on how the work was split across processes or interruptions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

__all__ = ["MINED_CONDITIONS", "ConditionStats", "MiningStats", "active_neurons"]

MINED_CONDITIONS = ("relevant", "irrelevant")


def active_neurons(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean ``[..., I]``: neurons whose score is positive and at least ``threshold`` x the largest score of
    their row (one example, one layer) — the knowledge-neurons rule. A row whose largest score is not positive
    has no active neuron."""
    top = scores.amax(dim=-1, keepdim=True)
    return (scores > 0) & (scores >= threshold * top)


@dataclass
class ConditionStats:
    """Per-neuron statistics of one condition over some examples.

    Attributes:
        counts: ``[L, I]`` int64, the number of examples in which each neuron was active.
        score_sums: ``[L, I]`` float64, the sum of each neuron's IG score over the examples.
        examples: the number of examples.
        skipped: records without a prompt for this condition, by reason.
    """

    counts: torch.Tensor
    score_sums: torch.Tensor
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)

    @classmethod
    def zeros(cls, layers: int, intermediate: int) -> ConditionStats:
        return cls(torch.zeros(layers, intermediate, dtype=torch.int64),
                   torch.zeros(layers, intermediate, dtype=torch.float64))

    def add_examples(self, scores: torch.Tensor, threshold: float) -> None:
        """Add examples' ``[B, L, I]`` float32 scores, one after another in order."""
        active = active_neurons(scores, threshold)
        for b in range(scores.shape[0]):  # a sequential sum: its rounding does not depend on B or on threads
            self.counts += active[b]
            self.score_sums += scores[b].double()
        self.examples += int(scores.shape[0])

    def add(self, other: ConditionStats) -> None:
        self.counts += other.counts
        self.score_sums += other.score_sums
        self.examples += other.examples
        self.skipped.update(other.skipped)


@dataclass
class MiningStats:
    """The statistics of both conditions (:data:`MINED_CONDITIONS`) over some records."""

    conditions: dict[str, ConditionStats]

    @classmethod
    def zeros(cls, layers: int, intermediate: int) -> MiningStats:
        return cls({c: ConditionStats.zeros(layers, intermediate) for c in MINED_CONDITIONS})

    def add(self, other: MiningStats) -> None:
        for condition, stats in self.conditions.items():
            stats.add(other.conditions[condition])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors (the example and skip counts go to metadata: see :meth:`metadata`)."""
        out = {}
        for condition, stats in self.conditions.items():
            out[f"{condition}.counts"] = stats.counts
            out[f"{condition}.score_sums"] = stats.score_sums
        return out

    def metadata(self) -> dict:
        return {c: {"examples": s.examples, "skipped": dict(sorted(s.skipped.items()))}
                for c, s in self.conditions.items()}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], metadata: dict) -> MiningStats:
        return cls({
            c: ConditionStats(tensors[f"{c}.counts"], tensors[f"{c}.score_sums"], int(metadata[c]["examples"]),
                              Counter(metadata[c]["skipped"]))
            for c in MINED_CONDITIONS
        })
