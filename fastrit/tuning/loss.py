"""The causal-LM loss without holding the logits: only labelled positions, a chunk of them at a time.

transformers' ``model(input_ids, labels=...)`` forms the logits of every position (``[B, T, V]``) in float32,
then their log-softmax and, in backward, their gradient: at Llama-3's 128 K vocabulary and 2048 tokens, 1 GiB
per copy. :func:`causal_lm_loss` takes the hidden states of the positions that predict a label only (the answer
tokens, for an answer-only loss), and sends them through the output head ``chunk_size`` positions at a time under
activation checkpointing, so that at most one chunk's logits exist at once, in forward and in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, chunk_size: int = 1024,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as transformers' causal-LM loss.

    Args:
        model: a transformers causal LM (``model.base_model`` gives the final-normed hidden states and
            ``get_output_embeddings()`` the head; Gemma2/3 logit soft-capping is applied as their forward does).
        input_ids: ``[B, T]`` int64; ``labels``: ``[B, T]`` int64, ``-100`` where no loss is taken; position
            ``t``'s hidden state predicts ``labels[:, t + 1]`` (the shift transformers applies).
        attention_mask: ``[B, T]`` or None.
        chunk_size: labelled positions per pass through the head.
        num_items_in_batch: divide the summed loss by this instead of the number of labelled positions (the
            Trainer's gradient-accumulation normalisation).

    Returns a float32 scalar, differentiable in the model's trainable parameters. With no labelled position the
    loss is 0 (and differentiable), not NaN.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"labels: expected the shape of input_ids [B, T] {list(input_ids.shape)}, "
                         f"got {list(labels.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][picked]  # [N, D]: only the positions that predict a label
    targets = targets[picked]
    total = hidden.float().sum() * 0.0  # keeps the graph when nothing is labelled
    for start in range(0, targets.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, hidden[part], targets[part], head, softcap, use_reentrant=False)
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / max(count, 1) if not isinstance(count, torch.Tensor) else total / count.clamp(min=1)
