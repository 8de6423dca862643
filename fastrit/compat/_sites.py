"""Where the knowledge-neurons drop-in finds a model's neurons, for each ``model_type`` it accepts.

The knowledge-neurons package (PyPI ``knowledge-neurons`` 0.0.2) attributes:

- ``model_type="bert"``: the output of ``bert.encoder.layer[l].intermediate`` (after the activation) at the
  ``[MASK]`` position; that tensor is the input of ``output.dense``, fastrit's neuron site;
- any ``model_type`` containing ``"gpt"``: the output of ``transformer.h[l].mlp.c_fc``, *before* the activation,
  at the last position (GPT-2, GPT-Neo, GPTBigCode; OpenAI GPT has no key/value cache and is not supported).

The families fastrit recognises beyond those (``fastrit.FAMILIES``: Llama, Mistral, Qwen, Gemma, Phi-3,
GPT-NeoX) are attributed at fastrit's neuron site (the input of the MLP output projection), at the last position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import FAMILIES, ArchSpec, ModelArch, is_conv1d, resolve_arch

__all__ = ["KNSites", "SUPPORTED_MODEL_TYPES", "resolve_sites"]

_BERT = ArchSpec(
    layers="encoder.layer", mlp_out="output.dense", final_norm="", additive_mlp=False, head="cls", bidirectional=True
)
# the package's GPT path, by the model's own transformers model_type
_GPT_SPECS = {
    "gpt2": ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f", site="mlp.c_fc"),
    # GPT-Neo's local attention masks by token index: rows are not packed as extra tokens
    "gpt_neo": ArchSpec(
        layers="h", mlp_out="mlp.c_proj", final_norm="ln_f", site="mlp.c_fc", pack_rows=False,
        layer_returns_tuple=True,
    ),
    "gpt_bigcode": ArchSpec(layers="h", mlp_out="mlp.c_proj", final_norm="ln_f", site="mlp.c_fc"),
}
_FAMILY_TYPES = tuple(sorted(set(FAMILIES) - {"gpt2"}))

#: what ``model_type=`` accepts: the package's values, then fastrit's other families by transformers model_type
SUPPORTED_MODEL_TYPES = ("bert", "gpt", "gpt2", "gpt_neo", *_FAMILY_TYPES)


@dataclass(frozen=True)
class KNSites:
    """One model's neuron sites as the drop-in sees them.

    Attributes:
        kind: ``"bert"`` (masked LM, the ``[MASK]`` position), ``"gpt"`` (the package's GPT path, the ``c_fc``
            output) or ``"family"`` (fastrit's neuron site); the last two score the last position.
        arch: the live modules (``arch.spec`` says where the site is).
        attrs: the package's attribute paths for this model (``transformer_layers_attr``, ``input_ff_attr``,
            ``output_ff_attr``, ``word_embeddings_attr``), kept on the drop-in for code that reads them.
    """

    kind: str
    arch: ModelArch
    attrs: dict

    @property
    def masked_lm(self) -> bool:
        return self.kind == "bert"

    def patch(self, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
        """Hook layer ``layer`` so that its site ``[batch, T, I]`` becomes ``edit(site)``; returns the handle."""
        if self.arch.site_out is not None:
            return self.arch.site_out[layer].register_forward_hook(lambda module, args, output: edit(output))
        return self.arch.mlp_out[layer].register_forward_pre_hook(lambda module, args: (edit(args[0]), *args[1:]))

    def output_weight(self, layer: int) -> tuple[torch.Tensor, bool]:
        """``(weight, neuron_rows)``: the MLP output projection's weight of layer ``layer``, and whether neuron
        ``i`` is its row ``i`` (GPT-2's ``Conv1D``) rather than its column ``i`` (``nn.Linear``)."""
        module = self.arch.mlp_out[layer]
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise ValueError(
                f"model: the MLP output projection of layer {layer} is a {type(module).__name__}; modifying "
                "weights needs a dense nn.Linear or Conv1D (not a quantized layer)"
            )
        return module.weight, is_conv1d(module)

    def word_embeddings(self) -> torch.Tensor:
        """``[V, D]`` input word embeddings."""
        return self.arch.model.get_input_embeddings().weight


def _model_type_error(model_type: object) -> ValueError:
    return ValueError(
        f"model_type: expected one of {', '.join(SUPPORTED_MODEL_TYPES)} (or another name containing 'gpt' for a "
        f"model with transformer.h[*].mlp.c_fc, as knowledge-neurons accepts), got {model_type!r}"
    )


def resolve_sites(model: nn.Module, model_type: str) -> KNSites:
    """The sites of ``model`` for the package's ``model_type``, or a ValueError naming what does not fit."""
    if not isinstance(model_type, str):
        raise _model_type_error(model_type)
    actual = getattr(getattr(model, "config", None), "model_type", None)
    prefix = getattr(model, "base_model_prefix", "") or "model"
    if model_type == "bert":
        if actual != "bert" or not hasattr(model, "cls"):
            raise ValueError(
                f"model_type: 'bert' needs a BERT masked LM (BertForMaskedLM or BertLMHeadModel, with a 'cls' head), "
                f"got a {actual!r} model ({type(model).__name__})"
            )
        if getattr(model.config, "is_decoder", False):
            raise ValueError("model: a BERT configured as a decoder (is_decoder=True) has no [MASK] reading")
        attrs = dict(
            transformer_layers_attr="bert.encoder.layer", input_ff_attr="intermediate",
            output_ff_attr="output.dense.weight", word_embeddings_attr="bert.embeddings.word_embeddings.weight",
        )
        return KNSites("bert", resolve_arch(model, _BERT), attrs)
    if model_type in _FAMILY_TYPES:
        if actual != model_type:
            raise ValueError(f"model_type: {model_type!r} does not match the model, a {actual!r} model")
        spec = FAMILIES[model_type]
        attrs = dict(
            transformer_layers_attr=f"{prefix}.{spec.layers}", input_ff_attr=spec.mlp_out,
            output_ff_attr=f"{spec.mlp_out}.weight", word_embeddings_attr="get_input_embeddings().weight",
        )
        return KNSites("family", resolve_arch(model, spec), attrs)
    if "gpt" in model_type:
        spec = _GPT_SPECS.get(actual)
        if spec is None:
            raise ValueError(
                f"model_type: {model_type!r} (the package's GPT path) needs a GPT-2, GPT-Neo or GPTBigCode model "
                f"(transformer.h[*].mlp.c_fc), got a {actual!r} model"
                + (f"; for it pass model_type={actual!r}" if actual in _FAMILY_TYPES else "")
            )
        attrs = dict(
            transformer_layers_attr="transformer.h", input_ff_attr="mlp.c_fc", output_ff_attr="mlp.c_proj.weight",
            word_embeddings_attr="transformer.wte.weight",
        )
        return KNSites("gpt", resolve_arch(model, spec), attrs)
    raise _model_type_error(model_type)
