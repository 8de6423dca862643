"""``fastrit.trainable_summary``: trainable, frozen and deactivated counts per decoder layer."""

from __future__ import annotations

from torch import nn

from ..arch import decoder_layers
from ..nn import NeuronMLP, NF4Linear

__all__ = ["trainable_summary"]


def _count(module: nn.Module) -> tuple[int, int, int]:
    """``(trainable, frozen, of which NF4)`` parameter counts; an NF4 weight counts as its ``out x in`` values."""
    trainable = frozen = nf4 = 0
    for sub in module.modules():
        if isinstance(sub, NF4Linear):
            nf4 += sub.in_features * sub.out_features
        for param in sub.parameters(recurse=False):
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
    return trainable, frozen + nf4, nf4


def trainable_summary(model: nn.Module, *, print_table: bool = True) -> dict:
    """Per decoder layer and for the rest of the model: trainable and frozen parameters (NF4 weights counted as
    their number of values, also given apart) and deactivated neurons. Prints a table unless ``print_table`` is
    False; returns ``{"layers": [{...} per layer], "other": {...}, "total": {...}}``."""
    rows = []
    in_layers = set()
    for index, layer in enumerate(decoder_layers(model)):
        trainable, frozen, nf4 = _count(layer)
        in_layers.update(id(p) for p in layer.parameters())
        in_layers.update(id(m) for m in layer.modules())
        mlp = getattr(layer, "mlp", None)
        deactivated = mlp.deactivated_count if isinstance(mlp, NeuronMLP) else 0
        rows.append({"layer": index, "trainable": trainable, "frozen": frozen, "nf4": nf4,
                     "deactivated_neurons": deactivated})
    other_trainable = other_frozen = other_nf4 = 0
    for module in model.modules():
        if id(module) in in_layers:
            continue
        if isinstance(module, NF4Linear):
            other_nf4 += module.in_features * module.out_features
        for param in module.parameters(recurse=False):
            if id(param) in in_layers:
                continue
            if param.requires_grad:
                other_trainable += param.numel()
            else:
                other_frozen += param.numel()
    other = {"trainable": other_trainable, "frozen": other_frozen + other_nf4, "nf4": other_nf4}
    total = {key: sum(r[key] for r in rows) + other[key] for key in ("trainable", "frozen", "nf4")}
    total["deactivated_neurons"] = sum(r["deactivated_neurons"] for r in rows)
    summary = {"layers": rows, "other": other, "total": total}
    if print_table:
        print(f"{'layer':>6} {'trainable':>12} {'frozen':>14} {'of it NF4':>14} {'deactivated':>12}")
        for r in rows:
            print(f"{r['layer']:>6} {r['trainable']:>12,} {r['frozen']:>14,} {r['nf4']:>14,} "
                  f"{r['deactivated_neurons']:>12,}")
        print(f"{'other':>6} {other['trainable']:>12,} {other['frozen']:>14,} {other['nf4']:>14,}")
        print(f"{'total':>6} {total['trainable']:>12,} {total['frozen']:>14,} {total['nf4']:>14,} "
              f"{total['deactivated_neurons']:>12,}")
    return summary
