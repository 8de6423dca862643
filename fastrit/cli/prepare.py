"""``fastrit prepare`` (the model made ready for Neuro-RIT training, saved as a delta) and ``fastrit export``
(a prepared or tuned model as a plain transformers checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    HelpFormatter,
    add_delta_argument,
    add_model_arguments,
    add_prepare_arguments,
    delta_path,
    load_model,
    prepare_settings,
)

__all__ = ["add_parsers"]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare", formatter_class=HelpFormatter,
        help="deactivate neurons, freeze the rest (NF4 if it must), choose what trains; save that as a delta",
        description="fastrit.prepare on the model: the neuron sets' irrelevant-exclusive neurons removed, the target "
                    "layers' MLPs (or chosen neurons, or LoRA adapters) trainable, everything else frozen (in NF4 when "
                    "training would not fit the memory unquantized: --quantize). "
                    "Prints what trains per layer and writes the delta (fastrit.save_delta) that `fastrit eval`, "
                    "`fastrit export` and fastrit.load_delta read.",
    )
    add_model_arguments(prepare)
    add_prepare_arguments(prepare)
    prepare.add_argument("--out", metavar="FILE", default="prepared.safetensors", help="the delta file to write")
    prepare.set_defaults(run=run_prepare)

    export = subparsers.add_parser(
        "export", formatter_class=HelpFormatter,
        help="write a prepared or tuned model as a plain transformers checkpoint",
        description="Load the base model, apply the delta (fastrit.load_delta) and write a checkpoint of the "
                    "original architecture that transformers loads without fastrit (fastrit.export), with the "
                    "tokenizer.",
    )
    add_model_arguments(export)
    add_delta_argument(export, required=True)
    export.add_argument("--out", metavar="DIR", required=True, help="a new or empty folder for the checkpoint")
    export.add_argument("--quantized", action="store_true",
                        help="keep the NF4 frozen weights in bitsandbytes' 4-bit format (loading needs bitsandbytes)")
    export.set_defaults(run=run_export)


def run_prepare(args: argparse.Namespace) -> None:
    from ..tuning import prepare, save_delta, trainable_summary

    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: no such folder: {str(out.parent)!r}")
    sets, kwargs = prepare_settings(args)
    model, _ = load_model(args)
    prepare(model, sets, **kwargs)
    print(f"frozen layers: {model.fastrit_preparation.settings['quantize_reason']}")
    trainable_summary(model)
    save_delta(model, out)
    print(f"saved to {out}")


def run_export(args: argparse.Namespace) -> None:
    from ..tuning import export, load_delta

    delta = delta_path(args.delta)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {str(out)!r} exists and is not an empty folder")
    model, tokenizer = load_model(args)
    load_delta(model, delta)
    export(model, out, quantized=args.quantized, tokenizer=tokenizer)
    print(f"exported {delta} to {out}")
