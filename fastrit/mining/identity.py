"""Fingerprints that say whether a saved mining run was made with the same model, tokenizer and data."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..arch import ModelArch
from ..data import RagData

__all__ = ["data_fingerprint", "model_identity", "tokenizer_fingerprint"]

_WEIGHT_SAMPLES = 1024  # elements hashed per parameter: enough to tell checkpoints apart, cheap at 8B


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def model_identity(model: nn.Module, arch: ModelArch) -> dict:
    """``model_type``, ``num_layers``, ``intermediate_size``, a hash of the config (without private and
    bookkeeping keys) and a hash of a strided sample of every parameter (names, shapes, dtypes and values)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    weights = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _WEIGHT_SAMPLES)][:_WEIGHT_SAMPLES].cpu().contiguous()
        weights.update(f"{name}:{list(param.shape)}:{param.dtype}".encode())
        weights.update(sample.view(torch.uint8).numpy().tobytes())
    return {
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": arch.num_layers,
        "intermediate_size": arch.intermediate_size,
        "config_sha256": _sha(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_sha256": weights.hexdigest(),
    }


def data_fingerprint(data: RagData, records: int) -> dict:
    """The number of records used and a hash of their canonical content."""
    digest = hashlib.sha256()
    for record in data.records.select(range(records)):
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return {"records": records, "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's class, size, special tokens and vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(tokenizer.special_tokens_map.items())
    return _sha(type(tokenizer).__name__.encode(), json.dumps([len(tokenizer), special, vocab]).encode())
