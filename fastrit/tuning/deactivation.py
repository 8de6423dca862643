"""How many mined neurons to deactivate: as many as leave the untrained model's predictions nearly as they were.

Mining marks as irrelevant-exclusive every neuron active in at least a share of the irrelevant-context examples
and in fewer of the relevant-context ones. On a real model that set can be hundreds of neurons across every layer,
and zeroing all of them changes what the model predicts before any training (on SmolLM2-135M, 318 neurons moved
logits by up to 12.4). Deactivation is meant to silence what reacts to irrelevant passages, not to damage the
model; so the mined neurons are ranked, the most specific to irrelevant contexts first (the share of irrelevant
examples they are active in, minus the share of relevant ones), and the longest prefix of that ranking is kept
whose zeroing keeps the most likely next token on at least ``1 - tolerance`` of the positions of a few of the
user's prompts. The prefix is found by bisection over its length (the change grows with the prefix, near enough),
with forward passes of the prompts only: nothing is modified while it searches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..arch import ArchSpec
from ..mining import NeuronSets
from .effect import compare, next_token_logprobs, zeroed_neurons

__all__ = ["DEFAULT_TOLERANCE", "limit_deactivation", "ranked_neurons"]

#: the share of positions whose most likely next token deactivation may change by default
DEFAULT_TOLERANCE = 0.02


def ranked_neurons(neurons: Mapping[int, torch.Tensor], neuron_sets: NeuronSets) -> list[tuple[int, int]]:
    """``(layer, neuron)`` of ``neurons``, most specific to irrelevant contexts first: the share of irrelevant
    examples a neuron is active in minus the share of relevant ones (ties: lower layer, then lower index)."""
    irrelevant = neuron_sets.counts["irrelevant"].double() / max(1, neuron_sets.examples["irrelevant"])
    relevant = neuron_sets.counts["relevant"].double() / max(1, neuron_sets.examples["relevant"])
    specificity = irrelevant - relevant
    pairs = [(layer, int(i)) for layer, indices in sorted(neurons.items()) for i in indices.tolist()]
    return sorted(pairs, key=lambda p: (-float(specificity[p[0], p[1]]), p[0], p[1]))


def _as_map(pairs: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    out: dict[int, list[int]] = {}
    for layer, index in pairs:
        out.setdefault(layer, []).append(index)
    return {layer: torch.tensor(sorted(indices), dtype=torch.long) for layer, indices in out.items()}


def limit_deactivation(model: nn.Module, neurons: Mapping[int, torch.Tensor], neuron_sets: NeuronSets,
                       check: dict[str, torch.Tensor], before: torch.Tensor,
                       tolerance: float, spec: ArchSpec | None = None) -> tuple[dict[int, torch.Tensor], dict]:
    """``(the neurons to deactivate, a record of the search)``: the longest prefix of :func:`ranked_neurons` whose
    zeroing keeps the argmax next token on at least ``1 - tolerance`` of the positions of ``check`` (a batch of
    ``input_ids`` / ``attention_mask``); ``before``: the model's own :func:`next_token_logprobs` on ``check``. The
    model is run with hooks only and left as it was; ``spec``: where its MLPs are (default the model's)."""
    ranking = ranked_neurons(neurons, neuron_sets)

    def agreement(count: int) -> float:
        with zeroed_neurons(model, _as_map(ranking[:count]), spec):
            return compare(before, next_token_logprobs(model, check)).argmax_agreement

    low, high = 0, len(ranking)  # invariant: the first `low` fit; more than `high` do not
    evaluations = 0
    if ranking:
        evaluations += 1
        if agreement(high) >= 1 - tolerance:
            low = high
        else:
            high -= 1
    while low < high:
        middle = (low + high + 1) // 2
        evaluations += 1
        if agreement(middle) >= 1 - tolerance:
            low = middle
        else:
            high = middle - 1
    record = {"mined": len(ranking), "kept": low, "tolerance": tolerance, "forward_rounds": evaluations}
    return _as_map(ranking[:low]), record
