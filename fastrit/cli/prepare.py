"""``fastrit prepare`` (the model made ready for Neuro-RIT training, saved as a delta) and ``fastrit export``
(a prepared or tuned model as a plain transformers checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import _args
from ._common import (
    HelpFormatter,
    add_data_arguments,
    add_delta_argument,
    add_model_arguments,
    add_prepare_arguments,
    delta_path,
    load_data,
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
                    "training would not fit the memory unquantized: --quantize). Deactivation is limited to the "
                    "neurons that leave 98 %% of the next tokens of --check-prompts noisy-context prompts of --data "
                    "as they were, and what deactivation and quantization did to those prompts is printed. "
                    "Prints what trains per layer and writes the delta (fastrit.save_delta) that `fastrit eval`, "
                    "`fastrit export` and fastrit.load_delta read.",
    )
    add_model_arguments(prepare)
    add_prepare_arguments(prepare)
    add_data_arguments(prepare, default_split="train")
    prepare.add_argument("--check-prompts", type=int, default=None, metavar="N",
                         help="noisy-context prompts of the first --data records on which deactivation is limited "
                              "and the change to the model measured (default: as many as `fastrit tune` checks, 8; "
                              "0: none, every mined neuron deactivated)")
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
    from ..tuning.effect import ModelChange
    from ..tuning.trainer import CHECK_PROMPTS

    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: no such folder: {str(out.parent)!r}")
    count = CHECK_PROMPTS if args.check_prompts is None else args.check_prompts
    _args.integer("--check-prompts", count, low=0, what="a count >= 0")
    sets, kwargs = prepare_settings(args)
    data = load_data(args) if count else None
    model, tokenizer = load_model(args)
    if data is not None:
        kwargs["check_prompts"] = _check_prompts(data, tokenizer, model, count, args)
    prepare(model, sets, **kwargs)
    preparation = model.fastrit_preparation
    print(f"memory settings: {preparation.settings['quantize_reason']}")
    if preparation.settings["deactivation_limit"] is not None:
        print(f"deactivated: {preparation.settings['deactivation_limit']}")
    for name, change in preparation.effect.items():
        print(f"the untrained model after {name}: {ModelChange(**change)}")
    trainable_summary(model)
    save_delta(model, out)
    print(f"saved to {out}")


def _check_prompts(data, tokenizer, model, count: int, args) -> list[list[int]]:
    """The prompts of the first ``count`` noisy-context examples of ``--data``, built as tune builds its
    first stage's (so that `fastrit prepare` and `fastrit tune` deactivate the same neurons)."""
    from ..data import RagData
    from ..tuning.stages import stage_data

    def build(records):
        return stage_data(records, tokenizer, "denoise", k=args.k, template=args.template,
                          max_length=args.max_length, seed=args.seed, model=model)

    # each record's prompt depends on its index only: a prefix of the records gives tune's first prompts
    built = build(RagData(data.records.select(range(min(len(data), 4 * count)))))
    if len(built) < count:
        built = build(data)
    if len(built) == 0:
        raise ValueError(f"--data: no noisy-context prompt could be built from its {len(data)} records "
                         f"(skipped: {built.skipped})")
    return built.prompts(count)


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
