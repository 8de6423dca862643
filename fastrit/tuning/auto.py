"""Settings chosen from the device: whether the frozen layers need NF4 to fit.

NF4 is a cost, not a free saving: on a small real model (SmolLM2-135M) it alone changed the most likely next token
on a quarter of positions. ``quantize_frozen="auto"`` therefore keeps the model's own dtype whenever the training
step fits the memory there is (:func:`fastrit.plan_memory` against the device's memory), and quantizes only when
it must.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..memory import stored_bytes

__all__ = ["FIT_MARGIN", "available_memory", "choose_quantization"]

#: the share of the available memory a plan may use (allocator fragmentation, the CUDA context, other tensors)
FIT_MARGIN = 0.9
_PLAN_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
    """Bytes free for new allocations on ``device``: ``torch.cuda.mem_get_info`` on a GPU, the operating system's
    available memory on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return int(_cpu_available())
    raise ValueError(f"device: cannot tell the free memory of a {device.type!r} device; pass memory_budget")


def choose_quantization(model: nn.Module, *, train: str, train_layers: list[int], neurons: int | None,
                        gradient_checkpointing: bool, memory_budget: int | None,
                        planned_batch: tuple[int, int]) -> tuple[str | None, str]:
    """``(quantize_frozen, why)`` for ``quantize_frozen="auto"``: None (the model's dtype) when one training step of
    ``planned_batch`` = ``(batch size, sequence length)`` fits the budget unquantized, else "nf4".

    The budget is ``memory_budget`` bytes when given (the whole training run's, the model included), else what the
    model already holds on its device plus that device's available memory, times :data:`FIT_MARGIN`.
    """
    from .plan import plan_memory

    param = next(model.parameters())
    dtype = _PLAN_DTYPES.get(param.dtype)
    if dtype is None:
        return None, f"kept in {param.dtype}: no NF4 plan for it"
    device = param.device
    if memory_budget is None:
        if device.type not in ("cuda", "cpu"):
            return None, f"kept in {dtype}: the free memory of a {device.type} device is unknown; pass memory_budget"
        budget = int(FIT_MARGIN * (available_memory(device) + stored_bytes(model)))
        source = f"{device.type} memory available ({budget / 2**30:.1f} GiB with the model, x{FIT_MARGIN})"
    else:
        budget = int(memory_budget)
        source = f"memory_budget {budget / 2**30:.1f} GiB"
    batch_size, seq_len = planned_batch
    train_layer_list = list(train_layers) or [0]
    try:
        plan = plan_memory(model.config, seq_len=seq_len, batch_size=batch_size, train=train,
                           train_layers=train_layer_list, neurons=neurons, quantize_frozen=None,
                           gradient_checkpointing=gradient_checkpointing, dtype=dtype,
                           device="cuda" if device.type == "cuda" else "cpu")
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # a config plan_memory cannot read
        return None, (f"kept in {dtype}: no memory plan for this model ({error}); pass quantize_frozen='nf4' to "
                      "save memory")
    need = plan.peak_bytes
    if need <= budget:
        return None, (f"kept in {dtype}: the step needs {need / 2**30:.2f} GiB unquantized "
                      f"(batch {batch_size} x {seq_len} tokens), within {source}")
    return "nf4", (f"NF4: the step needs {need / 2**30:.2f} GiB unquantized (batch {batch_size} x {seq_len} "
                   f"tokens), more than {source}")
