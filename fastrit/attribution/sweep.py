"""Running the upper part of a model on injected hidden states, with its own layers.

IG rows for layer ``l`` differ from the clean forward only from layer ``l`` upwards and only at
positions ``>= p0`` (the first scaled position). :func:`run_tail` runs the model's own forward,
with the layers below the lowest *entry* layer replaced by pass-throughs, and at each entry layer
the input of the rows that enter there replaced by their given hidden states (what a row carries
below its own entry layer is discarded). Nothing below is recomputed and every family keeps its
own attention, rotary embeddings, norms and residual structure.

Rows are laid out as extra tokens: each batch row packs ``g`` IG rows of ``n`` tokens one after
another, all at the positions ``p0 .. p0 + n - 1``, and a 4D attention mask lets each IG row see
the cached prefix (positions ``< p0``, from the clean forward) and itself only. The prefix cache is
therefore shared by ``g`` IG rows instead of being copied for each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..arch import ModelArch

__all__ = ["RowLayout", "run_tail", "layers_bypassed"]


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the entry layer: returns its hidden states untouched (as the first item
    of a tuple where the real layers return tuples)."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor | tuple:
        return (hidden_states, None) if self.as_tuple else hidden_states


def _replace_rows_of_input(layout: RowLayout, slots: torch.Tensor, hidden: torch.Tensor) -> Callable:
    """A forward pre-hook giving the rows in ``slots`` the input ``hidden [k, n, D]``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        packed = args[0] if args else kwargs["hidden_states"]
        per_row = layout.unpack_all(packed).index_copy(0, slots, hidden.to(packed.dtype))
        replaced = layout.pack(per_row)
        if args:
            return (replaced, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replaced}

    return hook


@contextmanager
def layers_bypassed(arch: ModelArch, below: int) -> Iterator[None]:
    """Within the block, the decoder layers ``0 .. below-1`` are pass-throughs."""
    originals = [arch.layers[i] for i in range(below)]
    try:
        for i in range(below):
            arch.layers[i] = _PassThrough(arch.spec.layer_returns_tuple)
        yield
    finally:
        for i, module in enumerate(originals):
            arch.layers[i] = module


@dataclass(frozen=True)
class RowLayout:
    """How ``rows`` IG rows of ``n`` tokens each are packed into ``batch`` sequences of ``group * n`` tokens.

    Slots beyond ``rows`` (``batch * group - rows`` of them) are filler and are ignored.
    """

    rows: int
    n: int
    group: int
    causal: bool = True

    @classmethod
    def for_prefix(cls, rows: int, n: int, prefix: int, *, pack: bool = True, causal: bool = True) -> RowLayout:
        """The layout for rows after a cached ``prefix``; ``pack=False`` gives one row per sequence;
        ``causal=False`` lets each token of a row see all of that row (an encoder)."""
        # Packing g rows makes each query see prefix + g*n keys; keep g*n <= prefix so that
        # attention costs at most twice the unpacked cost while the prefix is stored once per g rows.
        group = max(1, min(rows, prefix // n)) if prefix > 0 and pack else 1
        return cls(rows, n, group, causal)

    @property
    def batch(self) -> int:
        return math.ceil(self.rows / self.group)

    @property
    def slots(self) -> int:
        return self.batch * self.group

    @property
    def tokens(self) -> int:
        return self.group * self.n

    def pack(self, per_row: torch.Tensor) -> torch.Tensor:
        """``[slots, n, ...] -> [batch, group * n, ...]``."""
        return per_row.reshape(self.batch, self.tokens, *per_row.shape[2:])

    def unpack_all(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, group * n, ...] -> [slots, n, ...]``."""
        return packed.reshape(self.slots, self.n, *packed.shape[2:])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, group * n, ...] -> [rows, n, ...]`` (filler slots dropped)."""
        return self.unpack_all(packed)[: self.rows]

    def attention_mask(self, prefix: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive float mask ``[batch, 1, group*n, prefix + group*n]``: the prefix and its own earlier tokens
        (every token of its own row when not causal)."""
        q = torch.arange(self.tokens, device=device)
        same_row = (q[:, None] // self.n) == (q[None, :] // self.n)
        visible = same_row & (q[None, :] <= q[:, None]) if self.causal else same_row
        visible = torch.cat([torch.ones(self.tokens, prefix, dtype=torch.bool, device=device), visible], dim=1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None].expand(self.batch, 1, *mask.shape)

    def position_ids(self, first: int, device: torch.device) -> torch.Tensor:
        """``[batch, group*n]``: every packed row sits at positions ``first .. first + n - 1``."""
        return torch.arange(first, first + self.n, device=device).repeat(self.group).expand(self.batch, -1)


def _prefix_cache(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], entry: int, batch: int) -> DynamicCache:
    data = []
    for layer, (keys, values) in enumerate(prefix_kv):
        if layer < entry:
            data.append((None, None))
        else:
            data.append((keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:])))
    return DynamicCache(ddp_cache_data=data)


def run_tail(
    arch: ModelArch,
    layout: RowLayout,
    first: int,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    entries: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Final-normed hidden states of rows that enter the model at different layers.

    Args:
        arch: the model's modules.
        layout: how the rows are packed.
        first: position of the rows' first token.
        prefix_kv: per layer, keys and values ``[1, heads, first, head_dim]`` of positions ``< first``
            from the clean forward; None when ``first == 0``.
        entries: ``layer -> (slots [k], hidden [k, n, D])``: the rows in ``slots`` take ``hidden`` as the
            input of ``layer`` (``arch.num_layers`` = the input of the final norm). Layers below the
            lowest entry are not run; a row's values before its own entry layer are discarded.

    Returns:
        ``[layout.rows, n, D]`` final-normed hidden states.
    """
    entry = min(entries)
    some_hidden = next(iter(entries.values()))[1]
    width = some_hidden.shape[-1]
    device, dtype = some_hidden.device, some_hidden.dtype
    cache = _prefix_cache(prefix_kv, entry, layout.batch) if prefix_kv is not None and first > 0 else None
    with ExitStack() as stack:
        stack.enter_context(layers_bypassed(arch, min(entry, arch.num_layers)))
        for layer, (slots, hidden) in entries.items():
            target = arch.layers[layer] if layer < arch.num_layers else arch.final_norm
            hook = _replace_rows_of_input(layout, slots, hidden)
            stack.callback(target.register_forward_pre_hook(hook, with_kwargs=True).remove)
        out = arch.base(
            inputs_embeds=torch.zeros(layout.batch, layout.tokens, width, device=device, dtype=dtype),
            attention_mask=layout.attention_mask(first, dtype, device),
            position_ids=layout.position_ids(first, device),
            **arch.cache_kwargs(cache),
            use_cache=cache is not None,
        )
    return layout.unpack(out.last_hidden_state)
