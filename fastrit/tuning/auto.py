"""Settings chosen from the device: whether the frozen layers need NF4, and the decoder layers checkpointing, to fit.

Neither is free. NF4 changes the model: on a small real model (SmolLM2-135M) it alone changed the most likely next
token on a quarter of positions. Gradient checkpointing recomputes every layer above the lowest trainable one in
backward (about a third more forward work there), and NF4 dequantizes each frozen weight once per forward and once
per recompute. On an 80-141 GB card an 8B model's bfloat16 weights and its saved activations fit, and both would
cost time for nothing; on a 12-24 GB card they are what makes the run fit.

:func:`choose_settings` therefore takes the first of these that fits the memory budget by :func:`fastrit.plan_memory`
(:data:`CANDIDATES`: the model unchanged first, then the fastest way to save memory):

1. the model's dtype, no checkpointing;
2. the model's dtype, checkpointing;
3. NF4, no checkpointing (each NF4 projection that backward passes through keeps its dequantized weight from the
   forward pass: little saved, no recompute);
4. NF4, checkpointing (the least memory).

A setting given explicitly (``quantize_frozen`` None or "nf4", ``gradient_checkpointing`` True or False) restricts
the candidates to those with it. When none fits, the one with the least memory is taken and the reason says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..memory import GIB, MemoryPlan, stored_bytes
from .loss import device_chunk_bytes

__all__ = ["CANDIDATES", "FIT_MARGIN", "Choice", "available_memory", "choose_for_model", "choose_settings"]

#: the share of the available memory a plan may use (allocator fragmentation, the CUDA context, other tensors)
FIT_MARGIN = 0.9
#: ``(quantize_frozen, gradient_checkpointing)`` in the order they are tried (see the module docstring)
CANDIDATES = ((None, False), (None, True), ("nf4", False), ("nf4", True))
_PLAN_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_settings` chose: the settings, the plan of the step with them, and why (one line)."""

    quantize_frozen: str | None
    gradient_checkpointing: bool
    plan: MemoryPlan
    why: str


def _cpu_available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on ``device``: on a GPU ``torch.cuda.mem_get_info``'s free memory plus what
    torch's caching allocator has reserved and does not use; on the CPU the operating system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":  # free on the device, plus what torch's caching allocator holds but does not use
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + unused)
    if device.type == "cpu":
        return int(_cpu_available())
    raise ValueError(f"device: cannot tell the free memory of a {device.type!r} device; pass memory_budget")


def size_text(nbytes: float) -> str:
    """``nbytes`` for a reader: GiB from 1 GiB up, else MiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _setting_text(quantize: str | None, checkpointing: bool, dtype: str) -> str:
    return f"{'NF4' if quantize == 'nf4' else dtype} frozen layers, {'' if checkpointing else 'no '}checkpointing"


def choose_settings(config, *, budget: int, budget_source: str, quantize_frozen: str | None = "auto",
                    gradient_checkpointing: bool | str = "auto", **plan_kwargs) -> Choice:
    """The first of :data:`CANDIDATES` allowed by ``quantize_frozen`` / ``gradient_checkpointing`` ("auto", or
    the value to keep) whose :func:`fastrit.plan_memory` ``peak_bytes`` is at most ``budget`` bytes; else the
    allowed one with the least memory (also when ``budget`` is 0: no budget known). ``budget_source`` says where
    the budget comes from (for ``why``);
    ``plan_kwargs`` go to plan_memory (seq_len, batch_size, train, train_layers, dtype, device, ...).
    """
    from .plan import plan_memory

    dtype = plan_kwargs.get("dtype", "bfloat16")
    allowed = [(q, c) for q, c in CANDIDATES
               if quantize_frozen in ("auto", q) and gradient_checkpointing in ("auto", c)]
    plans = []
    for quantize, checkpointing in allowed:
        plan = plan_memory(config, quantize_frozen=quantize, gradient_checkpointing=checkpointing, **plan_kwargs)
        plans.append((quantize, checkpointing, plan))
        if plan.peak_bytes <= budget:
            break
    batch = f"batch {plan_kwargs.get('batch_size', 1)} x {plan_kwargs.get('seq_len', 2048)} tokens"
    tried = "; ".join(f"{_setting_text(q, c, dtype)}: {size_text(p.peak_bytes)}" for q, c, p in plans)
    quantize, checkpointing, plan = plans[-1]
    if budget <= 0:
        quantize, checkpointing, plan = min(plans, key=lambda item: item[2].peak_bytes)
        why = f"{_setting_text(quantize, checkpointing, dtype)}: the least memory ({budget_source}; {tried})"
    elif plan.peak_bytes <= budget:
        why = (f"{_setting_text(quantize, checkpointing, dtype)}: the first setting whose step ({batch}) fits "
               f"{budget_source} (tried {tried})")
    else:
        quantize, checkpointing, plan = min(plans, key=lambda item: item[2].peak_bytes)
        why = (f"{_setting_text(quantize, checkpointing, dtype)}: no setting fits {budget_source} ({batch}; "
               f"{tried}); the one with the least memory")
    return Choice(quantize, checkpointing, plan, why)


def model_budget(model: nn.Module, memory_budget: int | None) -> tuple[int, str]:
    """``(bytes, where they come from)``: ``memory_budget`` when given, else what ``model`` already holds on its
    device plus that device's available memory, times :data:`FIT_MARGIN`."""
    if memory_budget is not None:
        return int(memory_budget), f"memory_budget {size_text(memory_budget)}"
    device = next(model.parameters()).device
    budget = int(FIT_MARGIN * (available_memory(device) + stored_bytes(model)))
    return budget, f"the {device.type} memory available ({size_text(budget)} with the model, x{FIT_MARGIN})"


def choose_for_model(model: nn.Module, *, train: str, train_layers: list[int], neurons: int | None,
                     quantize_frozen: str | None, gradient_checkpointing: bool | str, master_weights: bool,
                     memory_budget: int | None, planned_batch: tuple[int, int]) -> tuple[str | None, bool, str]:
    """``(quantize_frozen, gradient_checkpointing, why)`` for :func:`fastrit.prepare`'s "auto" settings: each
    "auto" chosen by :func:`choose_settings` for one training step of ``planned_batch`` = ``(batch size, sequence
    length)`` on the model's device. Where no plan can be made (a dtype or config plan_memory does not know, a
    device whose memory is unknown and no ``memory_budget``), "auto" means the model's dtype and checkpointing.
    """
    param = next(model.parameters())

    def fallback(reason: str) -> tuple[str | None, bool, str]:
        quantize = None if quantize_frozen == "auto" else quantize_frozen
        checkpointing = True if gradient_checkpointing == "auto" else gradient_checkpointing
        name = str(param.dtype).removeprefix("torch.")
        return quantize, checkpointing, f"{_setting_text(quantize, checkpointing, name)}: {reason}"

    dtype = _PLAN_DTYPES.get(param.dtype)
    if dtype is None:
        return fallback(f"no memory plan for {param.dtype}")
    if memory_budget is None and param.device.type not in ("cuda", "cpu"):
        return fallback(f"the free memory of a {param.device.type} device is unknown; pass memory_budget")
    budget, source = model_budget(model, memory_budget)
    batch_size, seq_len = planned_batch
    try:
        choice = choose_settings(
            model.config, budget=budget, budget_source=source, quantize_frozen=quantize_frozen,
            gradient_checkpointing=gradient_checkpointing, seq_len=seq_len, batch_size=batch_size, train=train,
            train_layers=list(train_layers) or [0], neurons=neurons, dtype=dtype, master_weights=master_weights,
            device="cuda" if param.device.type == "cuda" else "cpu",
            loss_chunk_bytes=device_chunk_bytes(param.device))
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a config plan_memory cannot read
        return fallback(f"no memory plan for this model ({error}); pass quantize_frozen='nf4' to save memory")
    return choice.quantize_frozen, choice.gradient_checkpointing, choice.why
