"""What fastrit's memory planners share: the plan type, the built-in model shapes, and a model on the meta device.

:func:`fastrit.plan_memory` (a training step, :mod:`fastrit.tuning.plan`) and :func:`fastrit.plan_attribution`
(an attribution call, :mod:`fastrit.attribution.plan`) both return a :class:`MemoryPlan`. This module sits on the
floor of :mod:`fastrit.arch`, below both, so that neither planner imports the other's package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

__all__ = ["BUILT_IN_CONFIGS", "DTYPES", "GIB", "MemoryPlan", "meta_model", "resolve_config", "stored_bytes"]

GIB = 1024**3

#: built-in names -> transformers config (the published shapes; no weights needed)
BUILT_IN_CONFIGS = {
    "llama-3-8b": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False),
    "mistral-7b": lambda: transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2-7b": lambda: transformers.Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False),
    "gemma-2-9b": lambda: transformers.Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True),
}
#: the dtypes a plan takes, by name
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training step or one attribution call, and its parts (bytes).

    Attributes:
        peak_bytes: the predicted peak.
        trainable_params: parameters that train (0 for an attribution plan).
        breakdown: part name -> bytes; how the parts make the peak is the planner's (its docstring, and ``summary``).
        settings: the settings the plan was made for.
        summary: the last line of :meth:`table` after the peak; empty: the training planner's wording.
    """

    peak_bytes: int
    trainable_params: int
    breakdown: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    summary: str = ""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def table(self) -> str:
        width = max(len(k) for k in self.breakdown)
        lines = [f"{name:<{width}}  {value / GIB:8.3f} GiB" for name, value in self.breakdown.items()]
        summary = self.summary or (f"{self.trainable_params:,} trainable; weights, gradients and states plus the "
                                   "larger of the step's and the optimizer's transients")
        lines.append(f"{'peak':<{width}}  {self.peak_gib:8.3f} GiB   ({summary})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def resolve_config(config) -> transformers.PretrainedConfig:
    """A transformers config, or the config of a built-in name (:data:`BUILT_IN_CONFIGS`); TypeError/ValueError
    naming ``config`` otherwise."""
    if isinstance(config, str):
        if config not in BUILT_IN_CONFIGS:
            raise ValueError(f"config: unknown name {config!r}; built-in: {sorted(BUILT_IN_CONFIGS)} "
                             "(or pass a transformers config)")
        return BUILT_IN_CONFIGS[config]()
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(f"config: expected a transformers config or a built-in name, got {type(config).__name__}")
    return config


def meta_model(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` in ``dtype`` on the meta device (shapes only; nothing allocated). The caller's
    config is not changed."""
    config = config.__class__.from_dict(config.to_dict())
    config.dtype = dtype
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (a tensor shared by two modules, such as a tied
    output head, once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
