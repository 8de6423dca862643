"""Running the upper part of a model on injected hidden states, with its own layers.

IG rows for layer ``l`` differ from the clean forward only from layer ``l`` upwards and only at
positions ``>= p0`` (the first scaled position). :func:`run_tail` runs the model's own forward
over one segment of layers at a time, the layers outside it replaced by pass-throughs: rows enter
at their *entry* layer and join the rows carried up from below, so no row is computed below its
entry layer. Nothing below is recomputed and every family keeps its own attention, rotary
embeddings, norms and residual structure.

Rows are laid out as extra tokens: each batch row packs ``g`` IG rows of ``n`` tokens one after
another, all at the positions ``p0 .. p0 + n - 1``, and a 4D attention mask lets each IG row see
the cached prefix (positions ``< p0``, from the clean forward) and itself only. The prefix cache is
therefore shared by ``g`` IG rows instead of being copied for each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
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
def layers_bypassed(arch: ModelArch, layers: int | Sequence[int]) -> Iterator[None]:
    """Within the block, the decoder layers in ``layers`` (an int ``b``: ``0 .. b-1``) are pass-throughs."""
    indices = list(range(layers)) if isinstance(layers, int) else list(layers)
    originals = {i: arch.layers[i] for i in indices}
    try:
        for i in indices:
            arch.layers[i] = _PassThrough(arch.spec.layer_returns_tuple)
        yield
    finally:
        for i, module in originals.items():
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
        most = max(1, min(rows, prefix // n)) if prefix > 0 and pack else 1
        # then as few filler slots as that many sequences allow (fewer than one per sequence): 65 rows at most 59
        # per sequence are 2 x 33, not 2 x 59 with 53 filler rows computed for nothing
        batch = math.ceil(rows / most)
        return cls(rows, n, math.ceil(rows / batch), causal)

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


def _prefix_cache(
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], layers: range, batch: int
) -> DynamicCache:
    """The prefix's keys and values for the decoder layers in ``layers`` (the others are pass-throughs)."""
    data = []
    for layer, (keys, values) in enumerate(prefix_kv):
        if layer in layers:
            data.append((keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:])))
        else:
            data.append((None, None))
    return DynamicCache(ddp_cache_data=data)


@contextmanager
def _output_captured(layer: nn.Module, into: list) -> Iterator[None]:
    """Within the block, ``into`` receives the (packed) output hidden states of each call of the decoder ``layer``."""

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        into.append(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_segment(
    arch: ModelArch,
    layout: RowLayout,
    first: int,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    layers: range,
    hidden: torch.Tensor,
    within: Callable[[RowLayout, int], AbstractContextManager] | None,
    top: bool,
) -> torch.Tensor:
    """``hidden [layout.rows, n, D]`` (the input of layer ``layers.start``) run through the decoder layers in
    ``layers`` only, by the model's own forward; returns ``[layout.rows, n, D]``: the final-normed output when
    ``top`` (then ``layers`` must reach the top), else the output of layer ``layers.stop - 1``."""
    cache = _prefix_cache(prefix_kv, layers, layout.batch) if prefix_kv is not None and first > 0 else None
    device, dtype = hidden.device, hidden.dtype
    captured: list[torch.Tensor] = []
    with ExitStack() as stack:
        stack.enter_context(layers_bypassed(arch, [i for i in range(arch.num_layers) if i not in layers]))
        target = arch.layers[layers.start] if layers.start < arch.num_layers else arch.final_norm
        every_row = torch.arange(layout.rows, device=device)
        hook = _replace_rows_of_input(layout, every_row, hidden)
        stack.callback(target.register_forward_pre_hook(hook, with_kwargs=True).remove)
        if not top:
            stack.enter_context(_output_captured(arch.layers[layers.stop - 1], captured))
        if within is not None:
            stack.enter_context(within(layout, layers.start))
        out = arch.base(
            inputs_embeds=torch.zeros(layout.batch, layout.tokens, hidden.shape[-1], device=device, dtype=dtype),
            attention_mask=layout.attention_mask(first, dtype, device),
            position_ids=layout.position_ids(first, device),
            **arch.cache_kwargs(cache),
            use_cache=cache is not None,
        )
    return layout.unpack(out.last_hidden_state if top else captured[-1])


def run_tail(
    arch: ModelArch,
    n: int,
    first: int,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    entries: list[tuple[int, torch.Tensor]],
    *,
    pack: bool = True,
    causal: bool = True,
    within: Callable[[RowLayout, int], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Final-normed hidden states of rows that enter the model at different layers; no row is computed below its
    own entry layer.

    The rows run in segments, one per entry layer, from the lowest: the rows entering at ``e_j`` join those carried
    from below, and the segment runs the layers ``e_j .. e_{j+1} - 1`` (the model's own forward, the other layers
    pass-throughs), so the batch grows as it moves up.

    Args:
        arch: the model's modules.
        n: tokens per row, at the positions ``first .. first + n - 1``.
        first: position of the rows' first token.
        prefix_kv: per layer, keys and values ``[1, heads, first, head_dim]`` of positions ``< first``
            from the clean forward; None when ``first == 0``.
        entries: ``(layer, hidden [k, n, D])`` in increasing layer order, each layer at most once: ``k`` rows take
            ``hidden`` as the input of ``layer`` (``arch.num_layers`` = the input of the final norm). The result's
            rows are in this order.
        pack, causal: the rows' layout (:meth:`RowLayout.for_prefix`).
        within: called as ``within(layout, entry)`` for each segment, a context manager entered while that segment
            runs (e.g. hooks of the entry layer, whose rows are the segment's last ``k`` slots of ``layout``).

    Returns:
        ``[rows, n, D]`` final-normed hidden states.
    """
    layers = [layer for layer, _ in entries]
    if layers != sorted(set(layers)):
        raise ValueError(f"entries: expected increasing, distinct entry layers, got {layers}")
    carried: torch.Tensor | None = None
    for j, (entry, hidden) in enumerate(entries):
        carried = hidden if carried is None else torch.cat([carried, hidden.to(carried.dtype)])
        stop = layers[j + 1] if j + 1 < len(layers) else arch.num_layers
        layout = RowLayout.for_prefix(len(carried), n, first, pack=pack, causal=causal)
        top = j + 1 == len(layers)
        carried = _run_segment(arch, layout, first, prefix_kv, range(entry, stop), carried, within, top)
    return carried
