"""``fastrit.export``: a prepared (and trained) model written back as a plain transformers checkpoint.

The checkpoint holds the model's original architecture (its class, config and parameter names), so
``AutoModelForCausalLM.from_pretrained`` loads it with no fastrit installed:

- a :class:`~fastrit.nn.NeuronMLP` becomes the family's own MLP again: trained neurons at their original
  indices, deactivated neurons as zero rows (input projections) and zero columns (output projection);
- PEFT LoRA adapters are merged into their base weights;
- NF4 weights are dequantized (bit for bit bitsandbytes' ``dequantize_4bit``), or, with ``quantized=True``, written
  in bitsandbytes' 4-bit serialization with a ``quantization_config`` in config.json, so that transformers loads
  them as ``Linear4bit`` layers holding the same bytes. What is not NF4 in the prepared model (trained MLPs, LoRA
  layers, the embeddings and the output head) stays dense and is listed in the config's ``llm_int8_skip_modules``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import _args
from ..arch import dense_weight, is_conv1d, mlp_layout
from ..nn import NeuronMLP, NF4Linear
from .prepare import PREPARATION_ATTR, meta_copy

__all__ = ["export"]


def _skeleton(model: nn.Module) -> nn.Module:
    skeleton = meta_copy(model)
    if skeleton is None:
        raise ValueError(f"model: cannot rebuild {type(model).__name__} from its config to find its original layout")
    return skeleton


def _bnb_tensors(name: str, layer: NF4Linear) -> dict[str, torch.Tensor]:
    """``layer`` as bitsandbytes' Linear4bit stores itself in a state dict under module name ``name``."""
    tensors = {f"{name}.weight": layer.packed}
    for key, value in layer.quant_state.as_dict(packed=True).items():
        tensors[f"{name}.weight.{key}"] = value
    return tensors


def _mlp_tensors(name: str, mlp: NeuronMLP, skeleton_mlp: nn.Module, layout) -> dict[str, torch.Tensor]:
    """A NeuronMLP as its family's dense MLP stores itself (zero rows and columns for deactivated neurons)."""
    dense = mlp.dense_weights()
    inputs = [torch.cat(dense.inputs)] if layout.fused else dense.inputs
    biases = [None if dense.input_biases[0] is None else torch.cat(dense.input_biases)] if layout.fused \
        else dense.input_biases
    tensors = {}
    for proj, weight, bias in zip(layout.inputs, inputs, biases, strict=True):
        tensors[f"{name}.{proj}.weight"] = weight.t() if layout.conv1d else weight
        if bias is not None:
            tensors[f"{name}.{proj}.bias"] = bias
    tensors[f"{name}.{layout.output}.weight"] = dense.output.t() if layout.conv1d else dense.output
    if dense.output_bias is not None:
        tensors[f"{name}.{layout.output}.bias"] = dense.output_bias
    expected = {f"{name}.{key}" for key in skeleton_mlp.state_dict()}
    if set(tensors) != expected:  # a family whose MLP holds more than its projections
        raise ValueError(f"model: cannot export the MLP at {name}: expected {sorted(expected)}, "
                         f"built {sorted(tensors)}")
    return tensors


def _quantizable_mlp(mlp: NeuronMLP) -> bool:
    """Whether the NeuronMLP is exactly a plain MLP of NF4 projections (nothing trainable, no mask)."""
    return (mlp.in_weight is None and mlp.frozen_keep is None and mlp.frozen_in is not None
            and all(type(m) is NF4Linear for m in [*mlp.frozen_in, mlp.frozen_out]))


def _linear_value(module: nn.Module, attr: str, conv1d: bool) -> torch.Tensor | None:
    weight, bias = dense_weight(module)
    if attr == "weight":
        return weight.t() if conv1d else weight
    return bias


def _state_dict(model: nn.Module, quantized: bool) -> tuple[dict[str, torch.Tensor], list[str], bool | None]:
    """``(tensors, dense linear module names, nested)`` of the checkpoint; ``nested``: whether the NF4 weights use
    double quantization (None when nothing is written in 4 bits)."""
    layout = mlp_layout(model)
    skeleton = _skeleton(model)
    tensors: dict[str, torch.Tensor] = {}
    quantized_modules: dict[str, NF4Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, NeuronMLP):
            continue
        if quantized and _quantizable_mlp(module):
            for proj, layer in zip(layout.inputs, module.frozen_in, strict=True):
                quantized_modules[f"{name}.{proj}"] = layer
            quantized_modules[f"{name}.{layout.output}"] = module.frozen_out
            if module.out_bias is not None:
                tensors[f"{name}.{layout.output}.bias"] = module.out_bias.detach()
        else:
            tensors.update(_mlp_tensors(name, module, skeleton.get_submodule(name), layout))
    skeleton_modules = dict(skeleton.named_modules())
    for name, module in model.named_modules():
        if type(module) is NF4Linear and quantized and name in skeleton_modules:
            quantized_modules[name] = module
    for name, layer in quantized_modules.items():
        tensors.update(_bnb_tensors(name, layer))
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    seen: dict[int, str] = {}
    for key in skeleton.state_dict():
        module_name, _, attr = key.rpartition(".")
        if key in tensors or module_name in quantized_modules:
            continue
        original = skeleton_modules[module_name]
        source = model.get_submodule(module_name)
        if isinstance(original, nn.Linear) or is_conv1d(original):
            value = _linear_value(source, attr, is_conv1d(original))
        else:
            value = getattr(source, attr)
            if id(value) in seen:  # tied weights (the output head and the input embeddings): written once
                continue
            seen[id(value)] = key
        if value is None:
            raise ValueError(f"model: nothing to export for {key}")
        tensors[key] = value.detach()
    dense_linears = [name for name, m in skeleton_modules.items()
                     if (isinstance(m, nn.Linear) or is_conv1d(m)) and name not in quantized_modules]
    nested = {layer.nested for layer in quantized_modules.values()}
    if len(nested) > 1:
        raise ValueError("model: NF4 weights with and without double quantization cannot share one checkpoint")
    return tensors, dense_linears, (nested.pop() if nested else None)


def _quantization_config(dense_linears: list[str], nested: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=dense_linears,
    )


def export(model: nn.Module, out_dir: str | os.PathLike, *, quantized: bool = False, tokenizer=None,
           max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` (prepared by :func:`fastrit.prepare`, trained or not) as a plain transformers checkpoint.

    Args:
        model: the prepared model; it is not modified.
        out_dir: a folder that does not exist yet or is empty. It is written complete or not at all (the files go
            to a temporary folder beside it, renamed at the end).
        quantized: write NF4 weights in bitsandbytes' 4-bit serialization (see the module docstring); loading
            then needs bitsandbytes (transformers reads the ``quantization_config``). Else every weight is dense.
        tokenizer: saved beside the model when given.
        max_shard_size: safetensors shard size (huggingface_hub's sharding; an index file when there are several).

    Returns the path of ``out_dir``. The checkpoint computes the prepared model's logits: exactly the same
    function (dense: up to float summation order; quantized: the same NF4 bytes).
    """
    from huggingface_hub import save_torch_state_dict

    if getattr(model, PREPARATION_ATTR, None) is None:
        raise ValueError("model: not prepared by fastrit.prepare (a plain model saves with save_pretrained)")
    _args.flag("quantized", quantized, type_error=True)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir: {out_dir} exists and is not an empty folder")
    tensors, dense_linears, nested = _state_dict(model, quantized)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if quantized and nested is None:
        raise ValueError("quantized: the model holds no NF4 weights to write in 4 bits (prepared with "
                         "quantize_frozen=None); export it with quantized=False")
    if quantized:
        dtype = next((t.dtype for t in tensors.values() if t.dtype.is_floating_point), torch.float32)
        config.quantization_config = _quantization_config(dense_linears, nested, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_torch_state_dict({k: v.contiguous() for k, v in tensors.items()}, tmp, max_shard_size=max_shard_size,
                              metadata={"format": "pt"})
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
