"""``fastrit.save_delta`` / ``fastrit.load_delta``: what preparation and training changed, and nothing else.

A delta is one safetensors file:

- ``deactivated.<layer>`` / ``trainable_neurons.<layer>``: int64 original neuron indices (:class:`Preparation`);
- ``param.<name>``: every trainable tensor of the prepared model (trained neurons' rows and columns, full MLP
  weights of the target layers, or LoRA adapters), under its parameter name in the prepared model;
- metadata ``fastrit_delta``: JSON with the format version, the settings :func:`fastrit.prepare` was called with,
  the target layers, the LoRA configuration (``train="lora"``) and the base model's identity (model type, layer
  count, hidden and intermediate sizes), checked when the delta is loaded.

The frozen weights are not in it: the delta of a tuned 8B model in ``train="neurons"`` is a few MB, in
``train="mlp"`` its three MLPs (about 2 GB: float32 master weights, prepare's default for 16-bit models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_path
from ..arch import ArchSpec, decoder_layers, linear_in_features, mlp_layout, mlp_of, model_spec, spec_from_json
from .prepare import PREPARATION_ATTR, prepare, prepare_on_meta

__all__ = ["load_delta", "save_delta"]

FORMAT = "fastrit-delta/1"
METADATA_KEY = "fastrit_delta"


def _identity(model: nn.Module, spec: ArchSpec | None = None) -> dict:
    layout = mlp_layout(model, spec)  # first: its error names the families prepare knows
    spec = model_spec(model, spec)
    layers = decoder_layers(model, spec)
    mlp = mlp_of(layers[0], spec)
    intermediate = getattr(mlp, "intermediate_size", None)
    if not isinstance(intermediate, int) or not hasattr(mlp, "frozen_index"):
        intermediate = linear_in_features(getattr(mlp, layout.output))
    config = model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return {"model_type": config.model_type, "num_layers": len(layers), "hidden_size": hidden,
            "intermediate_size": intermediate}


def save_delta(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write what :func:`fastrit.prepare` and training changed in ``model`` to ``path`` (one safetensors file,
    written atomically). ValueError naming ``model`` when it was not prepared."""
    from safetensors.torch import save_file

    preparation = getattr(model, PREPARATION_ATTR, None)
    if preparation is None:
        raise ValueError("model: not prepared by fastrit.prepare, so it has no delta")
    tensors = {}
    for layer, index in preparation.deactivated.items():
        tensors[f"deactivated.{layer}"] = index.cpu()
    for layer, index in preparation.trainable_neurons.items():
        tensors[f"trainable_neurons.{layer}"] = index.cpu()
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensors[f"param.{name}"] = param.detach().cpu().contiguous()
    meta = {"format": FORMAT, "settings": preparation.settings, "train_layers": preparation.train_layers,
            "lora_config": preparation.lora_config, "model": _identity(model)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ValueError(f"path: no delta file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[METADATA_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (KeyError, json.JSONDecodeError, OSError, SafetensorError) as error:
        raise ValueError(f"path: {path} is not a fastrit delta ({error})") from error
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} is a delta of format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, tensors


def _indices(tensors: dict[str, torch.Tensor], prefix: str) -> dict[int, torch.Tensor]:
    return {int(key[len(prefix):]): value for key, value in tensors.items() if key.startswith(prefix)}


def load_delta(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Prepare ``base_model`` (fresh, the model the delta was made from) as the delta's model was prepared and
    load its trained tensors; in place, and returned.

    Everything is checked before the model changes: the file (ValueError naming ``path``), the base model's type
    and shape against the delta's (ValueError naming ``base_model``), and the delta's tensors against the
    parameters preparation will create (names and shapes, found by preparing a copy of the model on the meta
    device, which allocates nothing).
    """
    path = Path(path)
    meta, tensors = _read(path)
    if getattr(base_model, PREPARATION_ATTR, None) is not None:
        raise ValueError("base_model: already prepared; load the delta onto a fresh base model")
    settings = meta["settings"]
    spec = spec_from_json(settings["spec"]) if settings.get("spec") is not None else None  # a family given by spec=
    identity = _identity(base_model, spec)
    if identity != meta["model"]:
        raise ValueError(f"base_model: the delta was made from {meta['model']}, this model is {identity}")
    train = settings["train"]
    kwargs = dict(deactivate=_indices(tensors, "deactivated.") or None, train_layers=meta["train_layers"],
                  train=train, quantize_frozen=settings["quantize_frozen"],
                  gradient_checkpointing=settings["gradient_checkpointing"],
                  master_weights=settings.get("master_weights", False),  # deltas before master weights: none
                  spec=spec)
    if train == "neurons":
        kwargs["neurons"] = _indices(tensors, "trainable_neurons.")
    if train == "lora":
        from peft import LoraConfig

        kwargs["lora_config"] = LoraConfig(**meta["lora_config"])
    params = {key[len("param."):]: value for key, value in tensors.items() if key.startswith("param.")}
    expected = _expected_parameters(base_model, kwargs)
    if expected != {name: tuple(value.shape) for name, value in params.items()}:
        raise ValueError(f"path: the delta's trained tensors do not fit the prepared model (expected "
                         f"{sorted(expected)}, the delta holds {sorted(params)})")
    model = prepare(base_model, **kwargs)
    with torch.no_grad():
        for name, value in params.items():
            param = model.get_parameter(name)
            param.copy_(value.to(param.dtype))
    return model


def _expected_parameters(base_model: nn.Module, kwargs: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the trainable parameters ``prepare(base_model, **kwargs)`` would create."""
    skeleton = prepare_on_meta(base_model, **kwargs)
    if skeleton is None:
        raise ValueError(f"base_model: cannot rebuild {type(base_model).__name__} from its config to check the delta")
    return {name: tuple(p.shape) for name, p in skeleton.named_parameters() if p.requires_grad}
