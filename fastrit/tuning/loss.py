"""The causal-LM loss without holding the logits: only labelled positions, a chunk of them at a time.

transformers' ``model(input_ids, labels=...)`` forms the logits of every position (``[B, T, V]``) in float32,
then their log-softmax and, in backward, their gradient: at Llama-3's 128 K vocabulary and 2048 tokens, 1 GiB
per copy. :func:`causal_lm_loss` takes the hidden states of the positions that predict a label only (the answer
tokens, for an answer-only loss) and sends them through the output head ``chunk_size`` positions at a time; each
chunk's gradient with respect to the hidden states (and the head, if it trains) is formed right there, from the
chunk's softmax, so at most one chunk's logits exist at once and nothing is recomputed in backward: the same
matrix products as the plain loss, in far less memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _args

__all__ = ["IGNORE_INDEX", "MAX_CHUNK_BYTES", "MIN_CHUNK_BYTES", "causal_lm_loss", "chunk_positions",
           "loss_chunk_bytes"]

IGNORE_INDEX = -100
#: a chunk's memory budget (bytes) off a GPU, and the least on one
MIN_CHUNK_BYTES = 2**26
#: the most a chunk takes on a GPU
MAX_CHUNK_BYTES = 2**30


def loss_chunk_bytes(device_memory: int | None) -> int:
    """The default memory budget of one loss chunk on a device of ``device_memory`` bytes: 1/64 of it, between
    64 MiB and 1 GiB (None, a CPU: 64 MiB). Each chunk reads the whole output head once: Llama-3-8B's 2048
    positions in bf16 (6 bytes per position and vocabulary entry) take 2 chunks on an 80 GB GPU (1,395 positions
    each), 5 on a 24 GB one, 9 on a 12 GB one, 24 on the CPU (87 positions)."""
    if device_memory is None:
        return MIN_CHUNK_BYTES
    return int(min(max(device_memory // 64, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES))


def device_chunk_bytes(device: torch.device) -> int:
    """:func:`loss_chunk_bytes` for ``device``: its total memory on a GPU, None elsewhere."""
    if device.type == "cuda":
        return loss_chunk_bytes(torch.cuda.get_device_properties(device).total_memory)
    return loss_chunk_bytes(None)


def chunk_positions(vocab_size: int, dtype: torch.dtype, softcap: bool = False,
                    budget: int = MIN_CHUNK_BYTES) -> int:
    """Positions per chunk whose transient memory fits ``budget`` bytes (at least 1): per position, the float32
    logits (softmax and gradient formed in place), in a 16-bit ``dtype`` the head's output before the cast and the
    gradient cast back for the product, and with soft-capping the float32 derivative of its tanh and the square it
    is formed from."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_position = vocab_size * (4 + (itemsize if itemsize != 4 else 0) + (8 if softcap else 0))
    return max(1, budget // per_position)


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, chunk by chunk, its gradients formed in
    forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_size):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs_grad = needs_hidden or needs_weight or needs_bias
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_size):
            part = slice(start, start + chunk_size)
            h, t = hidden[part], targets[part]
            logits = F.linear(h, weight, bias).float()  # as transformers: the head in the model's dtype, then fp32
            through_cap = None
            if softcap:  # tanh(x / c) * c, in place; its derivative 1 - tanh^2 is kept for the gradient
                logits.div_(softcap).tanh_()
                if needs_grad:
                    through_cap = 1 - logits.square()
                logits.mul_(softcap)
            # In place from here on: one chunk of logits is the only [chunk, V] buffer (no temporary as large),
            # and exp is taken once. Shifted by the row maximum: exp never overflows.
            logits.sub_(logits.amax(dim=1, keepdim=True))
            picked = logits.gather(1, t[:, None]).squeeze(1)
            if not needs_grad:
                total += (torch.logsumexp(logits, dim=1) - picked).sum()
                del logits  # freed before the next chunk's logits are made, not after: one [chunk, V] at a time
                continue
            grad = logits.exp_()
            del logits
            sums = grad.sum(dim=1)
            total += (sums.log() - picked).sum()
            grad.div_(sums[:, None])  # d(sum of losses)/d logits = softmax - one_hot
            grad[torch.arange(t.numel(), device=t.device), t] -= 1
            if through_cap is not None:
                grad *= through_cap
            if needs_hidden:
                grad_hidden[part] = grad.to(weight.dtype) @ weight
            if needs_weight:
                grad_weight += grad.t() @ h.float()
            if needs_bias:
                grad_bias += grad.sum(0)
            del grad, through_cap  # as logits above
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.present = (needs_hidden, needs_weight, needs_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = []
        for present, dtype in zip(ctx.present, ctx.dtypes, strict=True):
            grads.append((next(saved) * grad_total).to(dtype) if present else None)
        return (*grads, None, None, None)


def _final_hidden_states(model: nn.Module, inner: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's final-normed hidden states ``[B, T, D]``, taken from the decoder's output during a forward
    through ``model`` itself with the head applied to no position (``logits_to_keep``): a wrapper around the model
    (``inner`` is the model) sees the forward, and DistributedDataParallel synchronises gradients only for forwards
    that go through it."""
    # use_cache=False: a training forward has no use for a key/value cache (it would hold every layer's keys and
    # values for the whole step)
    captured = []
    handle = inner.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
              logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        handle.remove()
    return captured[0]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                   chunk_bytes: int | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as transformers' causal-LM loss.

    Args:
        model: a transformers causal LM whose forward takes ``logits_to_keep`` (every family fastrit supports),
            or such a model in a DistributedDataParallel wrapper (as the Trainer wraps it under torchrun). It is
            run through its own forward with the head applied to no position; the final-normed hidden states are
            taken from its decoder (``base_model``) and the head is ``get_output_embeddings()``. Gemma2/3 logit
            soft-capping is applied as their forward does.
        input_ids: ``[B, T]`` int64; ``labels``: ``[B, T]`` int64, ``-100`` where no loss is taken; position
            ``t``'s hidden state predicts ``labels[:, t + 1]`` (the shift transformers applies).
        attention_mask: ``[B, T]`` or None.
        chunk_size: labelled positions per pass through the head; default: as many as fit ``chunk_bytes``.
        chunk_bytes: the memory budget of one chunk when ``chunk_size`` is None (:func:`chunk_positions`);
            default :func:`loss_chunk_bytes` of the device's memory (64 MiB on the CPU; on a GPU 1/64 of its memory,
            at most 1 GiB). Fewer, larger chunks read the head fewer times.
        num_items_in_batch: divide the summed loss by this instead of the number of labelled positions (the
            Trainer's gradient-accumulation normalisation).

    Returns a float32 scalar, differentiable in the model's trainable parameters. With no labelled position the
    loss is 0 (and differentiable), not NaN.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(f"labels: expected the shape of input_ids [B, T] {list(input_ids.shape)}, "
                         f"got {list(labels.shape)}")
    inner = getattr(model, "module", model)  # a DistributedDataParallel wrapper keeps the model as .module
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"model: expected an nn.Linear output head, got {type(head).__name__}")
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    if chunk_bytes is None:
        chunk_bytes = device_chunk_bytes(head.weight.device)
    _args.positive("chunk_bytes", chunk_bytes, what="a positive number of bytes")
    if chunk_size is None:
        chunk_size = chunk_positions(head.out_features, head.weight.dtype, bool(softcap), chunk_bytes)
    _args.positive("chunk_size", chunk_size)
    hidden = _final_hidden_states(model, inner, input_ids, attention_mask)
    targets = labels[:, 1:]
    picked = targets != IGNORE_INDEX
    hidden = hidden[:, :-1][picked]  # [N, D]: only the positions that predict a label
    targets = targets[picked]
    total = _HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, softcap, chunk_size)
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / max(count, 1) if not isinstance(count, torch.Tensor) else total / count.clamp(min=1)
