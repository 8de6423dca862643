"""Argument checks shared by every op and backend: ValueError/TypeError naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value: object, ndim: int) -> torch.Tensor:
    """A float32/bfloat16/float16 tensor of ``ndim`` dimensions."""
    value = tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, bfloat16 or float16, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(value.shape)}")
    return value


def size(name: str, value: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(f"{name}: expected size {expected} in dimension {dim} ({what}), got shape {list(value.shape)}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: expected a tensor on {first} like {first_name}, got {device}")
    return first


def index(name: str, value: object, bound: int) -> torch.Tensor:
    """A 1-D int64 tensor of indices in ``[0, bound)``."""
    value = tensor(name, value)
    if value.dtype != torch.int64:
        raise TypeError(f"{name}: expected int64 indices, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of indices, got shape {list(value.shape)}")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= bound):
        low, high = int(value.min()), int(value.max())
        raise ValueError(f"{name}: indices must lie in [0, {bound}), got min {low}, max {high}")
    return value


def keep_mask(value: object, width: int) -> torch.Tensor | None:
    if value is None:
        return None
    value = tensor("keep", value)
    if value.dtype != torch.bool:
        raise TypeError(f"keep: expected a bool neuron mask, got {value.dtype}")
    if value.shape != (width,):
        raise ValueError(f"keep: expected shape [{width}], got {list(value.shape)}")
    return value


def weights(name: str, value: object, steps: int) -> torch.Tensor:
    """A 1-D float tensor of ``steps`` entries, returned as float32."""
    value = tensor(name, value)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a float tensor, got {value.dtype}")
    if value.shape != (steps,):
        raise ValueError(f"{name}: expected shape [{steps}], got {list(value.shape)}")
    return value.float()
