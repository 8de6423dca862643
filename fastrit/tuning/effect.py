"""What a change to a model does to its next-token predictions, measured on a few of the user's prompts.

:func:`fastrit.prepare` uses it to report what deactivating neurons and quantizing the frozen layers did to the
untrained model (``Preparation.effect``), and to warn when the change is large enough to matter: a prepared model
that already predicts differently from the model it came from starts its training from a damaged point, and the
export carries that damage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import _args
from ..arch import ArchSpec, resolve_arch
from ..evaluate import eval_mode

__all__ = ["ARGMAX_AGREEMENT_WARNING", "ModelChange", "check_batch", "compare", "next_token_logprobs",
           "zeroed_neurons"]

#: prepare warns when fewer than this share of positions keep their most likely next token
ARGMAX_AGREEMENT_WARNING = 0.98
#: most positions compared, shared equally by the prompts (each kept as float32 on the CPU: positions x vocab)
MAX_POSITIONS = 512


@dataclass(frozen=True)
class ModelChange:
    """How one model's next-token distributions differ from another's over the same positions.

    Attributes:
        kl_mean: mean over positions of KL(before || after), in nats.
        kl_max: the largest per-position KL, in nats.
        argmax_agreement: share of positions whose most likely next token is the same.
        max_logprob_change: the largest absolute change of any token's log-probability.
        positions: how many positions were compared.
    """

    kl_mean: float
    kl_max: float
    argmax_agreement: float
    max_logprob_change: float
    positions: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"argmax agrees on {self.argmax_agreement:.1%} of {self.positions} positions, "
                f"KL mean {self.kl_mean:.3g} / max {self.kl_max:.3g} nats")


def check_batch(prompts) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` ``[n, T]`` int64 from a batch dict (``input_ids`` and optionally
    ``attention_mask``) or a sequence of token id lists (right-padded here)."""
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts:
            raise ValueError("check_prompts: a mapping needs 'input_ids'")
        ids = torch.as_tensor(prompts["input_ids"], dtype=torch.long)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError("check_prompts: input_ids must be a non-empty [n, T] tensor")
        mask = prompts.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        if mask.shape != ids.shape:
            raise ValueError("check_prompts: attention_mask must have input_ids' shape")
        return {"input_ids": ids, "attention_mask": mask}
    if not isinstance(prompts, Sequence) or not prompts or any(
            not isinstance(p, Sequence) or not p or not all(map(_args.is_integer, p))
            for p in prompts):
        raise TypeError("check_prompts: expected a batch dict or a non-empty list of non-empty token id lists")
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def next_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor],
                        max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """``[P, V]`` float32 (CPU) log-probabilities of the next token at the attended positions of ``batch``, row by
    row: the last ``max_positions // rows`` positions of each row (every row weighs the same; what is kept is
    positions x vocabulary floats). The model runs in eval mode and is given back in its mode."""
    device = next(model.parameters()).device
    count = batch["input_ids"].shape[0]
    per_row = max(1, max_positions // count)
    rows = []
    with eval_mode(model):
        for row in range(count):
            keep = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][keep][None].to(device)
            if ids.shape[1] == 0:
                raise ValueError(f"check_prompts: prompt {row} has no attended token")
            logits = model(input_ids=ids, use_cache=False).logits[0, -per_row:]
            rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)


def compare(before: torch.Tensor, after: torch.Tensor) -> ModelChange:
    """The change from ``before`` to ``after``, two ``[P, V]`` log-probability tensors of the same positions."""
    if before.shape != after.shape:
        raise ValueError(f"after: expected shape {tuple(before.shape)}, got {tuple(after.shape)}")
    kl = (before.exp() * (before - after)).sum(-1).clamp_min(0)
    agree = (before.argmax(-1) == after.argmax(-1)).double().mean()
    return ModelChange(float(kl.mean()), float(kl.max()), float(agree), float((before - after).abs().max()),
                       before.shape[0])


def _zeroing_hook(indices: torch.Tensor):
    def zero(module, args):
        site = args[0].clone()
        site[..., indices.to(site.device)] = 0
        return (site, *args[1:])

    return zero


@contextlib.contextmanager
def zeroed_neurons(model: nn.Module, neurons: Mapping[int, torch.Tensor], spec: ArchSpec | None = None):
    """The model with the given neurons' site values set to 0 (fastrit's definition of deactivation), by forward
    pre-hooks on the MLP output projections (found by ``spec``, default the model's, as
    :func:`fastrit.arch.model_spec`); the hooks are removed on exit, whatever happens."""
    arch = resolve_arch(model, spec)
    with contextlib.ExitStack() as stack:
        for layer, indices in neurons.items():
            if not len(indices):
                continue

            hook = _zeroing_hook(torch.as_tensor(indices, dtype=torch.long))
            stack.callback(arch.mlp_out[layer].register_forward_pre_hook(hook).remove)
        yield model
