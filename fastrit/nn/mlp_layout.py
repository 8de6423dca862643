"""MLP weights read out neuron by neuron (:class:`MLPWeights`), in the layout the family registry gives.

Neuron ``i`` of a layer (fastrit's definition: column ``i`` of the MLP output projection's input) owns row ``i``
of every input projection (gated MLPs: gate and up; plain MLPs: fc), its bias entries, and column ``i`` of the
output projection. :class:`MLPWeights` holds them in ``nn.Linear`` orientation (``[out, in]``), whatever the
family stores (GPT-2's Conv1D keeps ``[in, out]``; Phi-3 fuses gate and up into one projection).

Where each family keeps its MLP projections is part of its :class:`fastrit.ArchSpec` (``spec.mlp``, an
:class:`MLPLayout`) in the one registry :data:`fastrit.arch.FAMILIES`; :data:`MLP_LAYOUTS` is a read-only view of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import FAMILIES, MLPLayout, dense_weight, is_bnb_4bit, is_conv1d, mlp_layout

__all__ = ["MLP_LAYOUTS", "MLPLayout", "MLPWeights", "dense_weight", "is_bnb_4bit", "is_conv1d", "mlp_layout"]


class _LayoutsView(Mapping):
    """model_type -> MLPLayout of every family in :data:`fastrit.arch.FAMILIES` that has one, read live."""

    def __getitem__(self, model_type: str) -> MLPLayout:
        layout = FAMILIES[model_type].mlp
        if layout is None:
            raise KeyError(model_type)
        return layout

    def __iter__(self) -> Iterator[str]:
        return (name for name, spec in FAMILIES.items() if spec.mlp is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: model_type -> layout, for the families fastrit recognises: a read-only view of :data:`fastrit.arch.FAMILIES`
#: (register a family there, as an ``ArchSpec`` with ``mlp=``; assigning here is a TypeError)
MLP_LAYOUTS: Mapping[str, MLPLayout] = _LayoutsView()


@dataclass
class MLPWeights:
    """One MLP's weights, neuron-major, in ``nn.Linear`` orientation.

    Attributes:
        inputs: per input of the activation (gated: gate, up; plain: fc), ``[I, H]``.
        input_biases: per input, ``[I]`` or None.
        output: ``[H, I]``.
        output_bias: ``[H]`` or None.
    """

    inputs: list[torch.Tensor]
    input_biases: list[torch.Tensor | None]
    output: torch.Tensor
    output_bias: torch.Tensor | None

    @classmethod
    def read(cls, mlp: nn.Module, layout: MLPLayout) -> MLPWeights:
        inputs, biases = [], []
        for name in layout.inputs:
            weight, bias = dense_weight(getattr(mlp, name))
            if layout.fused:
                half = weight.shape[0] // 2
                inputs += [weight[:half], weight[half:]]
                biases += [None, None] if bias is None else [bias[:half], bias[half:]]
            else:
                inputs.append(weight)
                biases.append(bias)
        output, output_bias = dense_weight(getattr(mlp, layout.output))
        return cls(inputs, biases, output, output_bias)

    @property
    def intermediate_size(self) -> int:
        return int(self.output.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.output.shape[0])
