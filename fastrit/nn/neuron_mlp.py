"""NeuronMLP: one layer's MLP with deactivated neurons removed and the rest split into frozen and trainable parts.

Each neuron of the layer (original index ``i`` in ``[0, I)``) is in exactly one of three sets:

- **trainable**: its input-projection rows (gate and up, or fc), their biases and its output-projection column are
  dense ``nn.Parameter`` s stored compactly (``in_weight [inputs * T, H]``, ``in_bias``, ``out_weight [H, T]``),
  so the gradient formed is exactly that of the chosen neurons and nothing else;
- **frozen**: computed by the frozen part, full width: one module per original input projection (``[I, H]``,
  Phi-3's fused ``[2I, H]``) and one for the output projection (``[I] -> [H]``), each an :class:`NF4Linear` or a
  dense ``nn.Linear`` that never requires grad;
- **deactivated**: contributes nothing: the same function as a zero at the neuron site.

The frozen part keeps the original shapes so that every frozen projection is a plain linear layer of the
original model (what :func:`fastrit.export` writes back, byte for byte in NF4). Neurons that are not frozen are
taken out of it in one of two ways, whichever needs no copy of a quantized weight:

- weights zeroed before they are stored (the rows of the inputs, the columns of the output): a zero row and
  column is the same function as a removed neuron, costs nothing at run time and needs no mask;
- a keep mask at the neuron site (``frozen_keep``, fastrit.ops.swiglu's keep mask for SiLU-gated MLPs), used when
  the frozen weights are adopted from a bitsandbytes 4-bit layer as they are (rewriting them would re-quantize).

The output is ``frozen_out(site(frozen_in(x)) * keep) + site(x @ in_weight^T + in_bias) @ out_weight^T +
out_bias``, where ``site`` is ``act(gate) * up`` (gated) or ``act(fc)`` (plain).

The trainable tensors may be kept in a wider dtype than the model computes in (float32 master weights of a
bfloat16/float16 model, ``fastrit.prepare(master_weights=True)``, so that small updates are not rounded away): the
forward pass casts them to the input's dtype, so the arithmetic is the model's own and the gradients arrive in the
master dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .mlp_layout import MLPLayout, MLPWeights, dense_weight, is_bnb_4bit
from .nf4_linear import NF4Linear

__all__ = ["NeuronMLP"]


def _frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantize: bool) -> nn.Module:
    """A linear map that never requires grad: NF4 when ``quantize``, else dense in the weight's dtype."""
    if quantize:
        return NF4Linear.from_weight(weight, bias)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer


def _as(tensor: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` in ``like``'s dtype (master weights compute in the model's dtype); None stays None."""
    return tensor if tensor is None or tensor.dtype == like.dtype else tensor.to(like.dtype)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _without_bias(layer: NF4Linear) -> NF4Linear:
    layer._buffers["bias"] = None
    return layer


class NeuronMLP(nn.Module):
    """An MLP whose neurons are deactivated, frozen or trainable (see the module docstring).

    Build one with :meth:`from_mlp`.

    Attributes:
        intermediate_size: the original number of neurons ``I``; ``hidden_size``: ``H``.
        frozen_index / trainable_index: ``[F]`` / ``[T]`` int64 original indices of the frozen / trainable neurons,
            sorted (buffers, not saved in the state dict).
        frozen_in: ``nn.ModuleList`` of the frozen input projections (one per original input projection, full
            width, in the order the activation takes them), or None when no neuron is frozen.
        frozen_out: the frozen output projection ``[I] -> [H]`` (no bias), or None.
        frozen_keep: ``[I]`` bool mask of the frozen neurons when the frozen weights were adopted unmodified from
            bitsandbytes, else None (the weights of the other neurons are zero).
        in_weight / in_bias / out_weight: the trainable neurons' rows (``[inputs * T, H]``, gate rows then up
            rows, or fc rows), their input biases (``[inputs * T]`` or None) and output columns (``[H, T]``).
        out_bias: the output projection's bias ``[H]`` (a Parameter, trainable only when asked), or None.
    """

    def __init__(self, layout: MLPLayout, act: nn.Module, intermediate_size: int, hidden_size: int, *,
                 frozen_index: torch.Tensor, trainable_index: torch.Tensor, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.layout, self.act, self.dropout = layout, act, dropout
        self.intermediate_size, self.hidden_size = intermediate_size, hidden_size
        self.inputs = 2 if layout.gated else 1
        self.register_buffer("frozen_index", frozen_index, persistent=False)
        self.register_buffer("trainable_index", trainable_index, persistent=False)
        self.register_buffer("frozen_keep", None, persistent=False)
        self.frozen_in: nn.ModuleList | None = None
        self.frozen_out: nn.Module | None = None
        self.in_weight = self.in_bias = self.out_weight = self.out_bias = None
        #: the dtype of the original MLP's weights: what :meth:`dense_weights` returns by default
        self.weight_dtype: torch.dtype = torch.float32

    @classmethod
    def from_mlp(cls, mlp: nn.Module, layout: MLPLayout, *, keep: torch.Tensor, train: torch.Tensor,
                 quantize_frozen: bool, train_out_bias: bool = False, mask_frozen: bool = False) -> NeuronMLP:
        """Build from a transformers MLP module (dense, or with bitsandbytes 4-bit projections).

        Args:
            keep: int64 original indices of the neurons that stay (the others are deactivated).
            train: int64 original indices of the trainable neurons, a subset of ``keep``.
            quantize_frozen: store dense frozen projections in NF4 (fastrit.ops.nf4_quantize). Projections that
                are bitsandbytes 4-bit layers already are adopted as they are (same bytes) whatever this says.
            train_out_bias: make the output bias trainable (full-MLP training), else frozen.
            mask_frozen: also apply the keep mask when the frozen weights are zeroed, for adapters (LoRA) added to
                the frozen projections later, which would otherwise revive the zeroed neurons.

        ``mlp`` itself is not modified.
        """
        weights = MLPWeights.read(mlp, layout)
        intermediate = weights.intermediate_size
        keep = torch.unique(keep.to(torch.int64).cpu())
        train = torch.unique(train.to(torch.int64).cpu())
        if not bool(torch.isin(train, keep).all()):
            raise ValueError("train: trainable neurons must be kept, not deactivated")
        frozen = keep[~torch.isin(keep, train)]
        dropout = getattr(mlp, layout.dropout) if layout.dropout else None
        device = weights.output.device  # the index buffers live with the weights (dense_weights builds there)
        module = cls(layout, getattr(mlp, layout.act), intermediate, weights.hidden_size,
                     frozen_index=frozen.to(device), trainable_index=train.to(device), dropout=dropout)
        module.weight_dtype = weights.output.dtype
        if frozen.numel():
            module._build_frozen(mlp, layout, weights, frozen.to(device), quantize_frozen)
            if mask_frozen and module.frozen_keep is None:
                module.frozen_keep = module._frozen_mask(frozen.to(device))
        if train.numel():
            index = train.to(device)
            module.in_weight = nn.Parameter(torch.cat([w.index_select(0, index) for w in weights.inputs]))
            if any(b is not None for b in weights.input_biases):
                module.in_bias = nn.Parameter(torch.cat([b.index_select(0, index) for b in weights.input_biases]))
            module.out_weight = nn.Parameter(weights.output.index_select(1, index).clone())
        if weights.output_bias is not None:
            module.out_bias = nn.Parameter(weights.output_bias.clone(), requires_grad=train_out_bias)
        module.train(mlp.training)
        return module

    def _build_frozen(self, mlp: nn.Module, layout: MLPLayout, weights: MLPWeights, frozen: torch.Tensor,
                      quantize: bool) -> None:
        projections = [getattr(mlp, name) for name in (*layout.inputs, layout.output)]
        if all(is_bnb_4bit(p) for p in projections):  # adopt the bytes as they are; a mask drops the others
            adopted = [NF4Linear.from_bnb(p) for p in projections]
            self.frozen_in = nn.ModuleList(adopted[:-1])
            self.frozen_out = _without_bias(adopted[-1])  # the output bias lives in out_bias
            self.frozen_keep = self._frozen_mask(frozen)
            return
        others = torch.ones(self.intermediate_size, dtype=torch.bool, device=frozen.device)
        others[frozen] = False
        modules = []
        for name in layout.inputs:
            weight, bias = dense_weight(getattr(mlp, name))
            rows = others.repeat(2) if layout.fused else others
            weight = weight.masked_fill(rows[:, None], 0)
            bias = None if bias is None else bias.masked_fill(rows, 0)
            modules.append(_frozen_linear(weight, bias, quantize))
        self.frozen_in = nn.ModuleList(modules)
        self.frozen_out = _frozen_linear(weights.output.masked_fill(others[None, :], 0), None, quantize)

    def _apply(self, fn, recurse: bool = True):
        """As nn.Module's, and :attr:`weight_dtype` follows a dtype change (``.to(torch.bfloat16)``, ``.half()``)."""
        super()._apply(fn, recurse)
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return self

    def _frozen_mask(self, frozen: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros(self.intermediate_size, dtype=torch.bool, device=frozen.device)
        keep[frozen] = True
        return keep

    @property
    def kept_index(self) -> torch.Tensor:
        """``[F + T]`` int64 original indices of the kept neurons, sorted."""
        return torch.sort(torch.cat([self.frozen_index, self.trainable_index])).values

    @property
    def deactivated_count(self) -> int:
        return self.intermediate_size - self.frozen_index.numel() - self.trainable_index.numel()

    def _site(self, pre: list[torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """Neuron activations ``[N, n]`` from the input projections' outputs (gate and up, or fc)."""
        if len(pre) == 1 and self.inputs == 2:  # fused gate_up
            pre = list(pre[0].chunk(2, dim=-1))
        if self.inputs == 1:
            site = self.act(pre[0])
            return site if keep is None else site * keep
        gate, up = pre
        if _is_silu(self.act):
            return ops.swiglu(gate.contiguous(), up.contiguous(), keep)
        site = self.act(gate) * up
        return site if keep is None else site * keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., H]`` in ``x.dtype``."""
        flat = x.reshape(-1, x.shape[-1])
        out = None
        # the trainable part first: under checkpointing, the recompute stops once every saved tensor is recomputed,
        # and the frozen output projection saves its weight before its product: that product is never recomputed
        if self.in_weight is not None:
            pre = F.linear(flat, _as(self.in_weight, flat), _as(self.in_bias, flat))
            out = F.linear(self._site(list(pre.chunk(self.inputs, dim=-1))), _as(self.out_weight, flat))
        if self.frozen_in is not None:
            frozen = self.frozen_out(self._site([m(flat) for m in self.frozen_in], self.frozen_keep))
            out = frozen if out is None else frozen + out
        if out is None:  # every neuron deactivated
            out = flat.new_zeros(flat.shape)
        if self.out_bias is not None:
            out = out + _as(self.out_bias, out)
        if self.dropout is not None:
            out = self.dropout(out)
        return out.reshape(x.shape)

    def dense_weights(self, dtype: torch.dtype | None = None) -> MLPWeights:
        """The MLP as one dense MLP of the original shapes (``[I, H]`` per input, gate then up; ``[H, I]`` output),
        with zero rows and columns for deactivated neurons and the frozen part dequantized, in ``dtype`` (default:
        the original MLP's weights' dtype, :attr:`weight_dtype`, whatever dtype master weights are kept in).
        Detached copies."""
        parts = []
        if self.frozen_in is not None:
            inputs = [dense_weight(m) for m in self.frozen_in]
            weights = [w for w, _ in inputs]
            biases = [b for _, b in inputs]
            if self.inputs == 2 and len(weights) == 1:  # fused gate_up
                weights = list(weights[0].chunk(2))
                biases = [None, None] if biases[0] is None else list(biases[0].chunk(2))
            output, _ = dense_weight(self.frozen_out)
            parts.append((self.frozen_index, weights, biases, output, True))
        if self.in_weight is not None:
            in_bias = self.in_bias.detach().chunk(self.inputs) if self.in_bias is not None else [None] * self.inputs
            parts.append((self.trainable_index, list(self.in_weight.detach().chunk(self.inputs)), list(in_bias),
                          self.out_weight.detach(), False))
        if dtype is None:
            dtype = self.weight_dtype
        device = self.frozen_index.device
        size, hidden = self.intermediate_size, self.hidden_size
        inputs = [torch.zeros(size, hidden, dtype=dtype, device=device) for _ in range(self.inputs)]
        has_bias = any(b is not None for part in parts for b in part[2])
        biases = [torch.zeros(size, dtype=dtype, device=device) if has_bias else None for _ in range(self.inputs)]
        output = torch.zeros(hidden, size, dtype=dtype, device=device)
        for index, part_inputs, part_biases, part_output, full in parts:  # full: the frozen part, full width
            index = index.to(part_output.device)
            for j in range(self.inputs):
                rows = part_inputs[j][index] if full else part_inputs[j]
                inputs[j][index] = rows.to(dtype)
                if part_biases[j] is not None:
                    biases[j][index] = (part_biases[j][index] if full else part_biases[j]).to(dtype)
            output[:, index] = (part_output[:, index] if full else part_output).to(dtype)
        bias = self.out_bias.detach().to(dtype).clone() if self.out_bias is not None else None
        return MLPWeights(inputs, biases, output, bias)

    def extra_repr(self) -> str:
        nf4 = self.frozen_out is not None and isinstance(self.frozen_out, NF4Linear)
        return (f"hidden={self.hidden_size}, neurons={self.intermediate_size}: frozen={self.frozen_index.numel()}"
                f"{' (nf4)' if nf4 else ''}{', masked' if self.frozen_keep is not None else ''}, "
                f"trainable={self.trainable_index.numel()}, deactivated={self.deactivated_count}")
