"""Checking attribution arguments and turning padded batches into scored sequences.

The *scored sequence* of an example is its real prompt tokens followed by ``answer[:-1]``
(teacher forcing); the answer token ``j`` is predicted at position ``prompt_len - 1 + j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .. import _args
from ..arch import ArchSpec, ModelArch, resolve_arch
from .integration import IntegrationRule, integration_rule

OBJECTIVES = ("logprob", "prob")
POSITIONS = ("last", "answer", "all")

__all__ = [
    "OBJECTIVES",
    "POSITIONS",
    "AttributionCall",
    "ScoredExample",
    "check_sequence_fits",
    "prepare_call",
    "resolve_layers",
    "check_optional_count",
    "check_settings",
    "objective_from_logits",
    "scored_examples",
]


@dataclass(frozen=True)
class ScoredExample:
    """One example, unpadded.

    Attributes:
        ids: ``[S]`` int64, prompt + answer[:-1].
        prompt_len: number of real prompt tokens ``Tp`` (>= 1).
        answer: ``[K]`` int64 answer tokens (K >= 1).
        positions: ``[P]`` int64, sorted positions whose site is scaled.
        readout: ``[K]`` positions whose logits score the K answer tokens; None = teacher forcing (the
            positions ``prompt_len - 1 ...`` that predict them). A masked LM reads them at its mask positions.
        bidirectional: the model is an encoder: scaling any position changes every position, so all are
            recomputed (``first_position`` is 0).
    """

    ids: torch.Tensor
    prompt_len: int
    answer: torch.Tensor
    positions: torch.Tensor
    readout: torch.Tensor | None = None
    bidirectional: bool = False

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @cached_property
    def first_position(self) -> int:
        """The first recomputed position: nothing before it changes when the site is scaled. Read from the device
        once (a host synchronisation on CUDA), then kept."""
        return 0 if self.bidirectional else int(self.positions[0])

    @property
    def answer_positions(self) -> torch.Tensor:
        """``[K]`` positions whose logits score the answer tokens."""
        if self.readout is not None:
            return self.readout
        return torch.arange(self.prompt_len - 1, self.length, device=self.ids.device)


def check_settings(
    objective: str,
    positions: str,
    method: str | None,
    steps: int | str,
    batch_size: int | None,
    delta_tol: float | None = None,
) -> IntegrationRule:
    """Validate the scalar settings of ``attribute``; raise ValueError/TypeError naming the argument. Returns the
    integration rule they resolve to (:func:`.integration.integration_rule`)."""
    _args.one_of("objective", objective, OBJECTIVES, what=f"one of {', '.join(OBJECTIVES)}")
    _args.one_of("positions", positions, POSITIONS, what=f"one of {', '.join(POSITIONS)}")
    rule = integration_rule(steps, method, delta_tol)
    check_optional_count("batch_size", batch_size)
    return rule


def check_optional_count(name: str, value: int | None) -> None:
    """``value`` must be None or an int >= 1: TypeError naming ``name`` for a non-integer, ValueError below 1."""
    _args.integer(name, value, low=1, optional=True, type_error=True)


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Normalise ``layers`` (None = all; negative indices count from the top) to a list of ints."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, (int, torch.Tensor)) or not isinstance(layers, Sequence) and not isinstance(layers, range):
        raise TypeError(f"layers: expected a list of layer indices or None, got {type(layers).__name__}")
    out = []
    for layer in layers:
        if not _args.is_integer(layer):
            raise TypeError(f"layers: expected int layer indices, got {type(layer).__name__}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layers: index {layer} is out of range for a model with {num_layers} layers")
        out.append(layer % num_layers)
    if not out:
        raise ValueError("layers: expected at least one layer index, got an empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"layers: duplicate layer indices in {list(layers)}")
    return out


def check_sequence_fits(model: nn.Module, length: int) -> None:
    """Raise if a scored sequence of ``length`` tokens is beyond what the 4D-mask sweep reproduces exactly."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = isinstance(window, int) and ("sliding_attention" in layer_types or not layer_types)
    if sliding and getattr(config, "use_sliding_window", True) and length >= window:
        raise ValueError(
            f"input_ids/target_ids: a scored sequence of {length} tokens reaches the model's sliding attention "
            f"window ({window}); attribution over sliding-window attention is not supported yet"
        )


def _check_int_matrix(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {list(value.shape)}")
    return value


def scored_examples(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_ids: torch.Tensor,
    positions: str,
    max_positions: int | None,
) -> list[ScoredExample]:
    """Unpad a batch into :class:`ScoredExample` s (on the device of ``input_ids``).

    Args:
        input_ids: ``[B, T]`` prompts, padded on either side.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding; None means all real.
        target_ids: ``[B, K]`` answer tokens, padded with -100.
        positions: one of :data:`POSITIONS`.
        max_positions: the model's maximum sequence length, or None if it has none.
    """
    input_ids = _check_int_matrix("input_ids", input_ids)
    target_ids = _check_int_matrix("target_ids", target_ids)
    batch, width = input_ids.shape
    if batch == 0 or width == 0:
        raise ValueError(f"input_ids: expected at least one prompt of at least one token, got {list(input_ids.shape)}")
    if target_ids.shape[0] != batch:
        raise ValueError(f"target_ids: expected {batch} rows to match input_ids, got {target_ids.shape[0]}")
    if target_ids.shape[1] == 0:
        raise ValueError("target_ids: expected at least one answer token per row, got shape [B, 0]")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {list(input_ids.shape)} like input_ids, got {list(attention_mask.shape)}"
        )
    attention_mask = attention_mask.to(input_ids.device)
    target_ids = target_ids.to(input_ids.device)

    examples = []
    for b in range(batch):
        real = attention_mask[b] != 0
        prompt = input_ids[b][real].long()
        answer = target_ids[b][target_ids[b] != -100].long()
        if prompt.numel() == 0:
            raise ValueError(f"attention_mask: row {b} has no real prompt token")
        if answer.numel() == 0:
            raise ValueError(f"target_ids: row {b} has no answer token (all -100)")
        if (answer < 0).any() or (prompt < 0).any():
            raise ValueError(f"target_ids/input_ids: row {b} holds a negative token id other than -100 padding")
        ids = torch.cat([prompt, answer[:-1]])
        if max_positions is not None and ids.numel() > max_positions:
            raise ValueError(
                f"input_ids/target_ids: row {b} is {ids.numel()} tokens long (prompt + answer - 1), "
                f"more than the model's maximum of {max_positions} positions"
            )
        prompt_len = int(prompt.numel())
        if positions == "last":
            scaled = torch.tensor([prompt_len - 1], device=ids.device)
        elif positions == "answer":
            scaled = torch.arange(prompt_len - 1, ids.numel(), device=ids.device)
        else:
            scaled = torch.arange(ids.numel(), device=ids.device)
        examples.append(ScoredExample(ids, prompt_len, answer, scaled))
    return examples


def objective_from_logits(logits: torch.Tensor, answer: torch.Tensor, objective: str) -> torch.Tensor:
    """The objective of each row from its logits at the answer positions.

    Args:
        logits: ``[R, K, V]`` logits at the K positions that predict the K answer tokens.
        answer: ``[K]`` answer token ids.
        objective: ``"logprob"`` (sum_j log p(answer_j | ...)) or ``"prob"`` (p(answer_0 | prompt)).

    Returns:
        ``[R]`` float32.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, answer.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    if objective == "logprob":
        return picked.sum(dim=-1)
    return picked[:, 0].exp()


@dataclass(frozen=True)
class AttributionCall:
    """A checked ``attribute`` call: the model's modules, the examples, the layers and the rule.

    ``alphas``/``weights`` are the integration points of a fixed rule; with an adaptive ``rule``
    (``steps="auto"``) they are its first round's and the engine grows them per layer.
    """

    arch: ModelArch
    examples: list[ScoredExample]
    layers: list[int]
    alphas: list[float]
    weights: list[float]
    settings: dict
    rule: IntegrationRule | None = None


def prepare_call(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_ids: torch.Tensor,
    objective: str,
    positions: str,
    steps: int | str,
    method: str | None,
    layers: Sequence[int] | None,
    spec: ArchSpec | None,
    delta_tol: float | None = None,
) -> AttributionCall:
    """Check every argument of ``attribute`` (ValueError/TypeError naming it) and unpad the batch."""
    arch = resolve_arch(model, spec)
    if arch.spec.bidirectional:
        raise ValueError(
            "spec: a bidirectional (encoder) spec scores a masked LM at its [MASK] positions, which "
            "fastrit.compat.KnowledgeNeurons does; attribute scores causal LMs (prompt + answer, teacher forcing)"
        )
    rule = check_settings(objective, positions, method, steps, None, delta_tol)
    layer_list = resolve_layers(layers, arch.num_layers)
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.to(arch.base.get_input_embeddings().weight.device)
    examples = scored_examples(input_ids, attention_mask, target_ids, positions, arch.max_positions)
    alphas, weights = rule.rounds()[0]
    settings = {
        "objective": objective,
        "positions": positions,
        "steps": rule.steps,
        "method": rule.method,
        **({"delta_tol": rule.delta_tol} if rule.adaptive else {}),
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
    }
    return AttributionCall(arch, examples, layer_list, alphas, weights, settings, rule)
