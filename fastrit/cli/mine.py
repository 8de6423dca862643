"""``fastrit mine`` (neurons of relevant and irrelevant contexts over a dataset) and ``fastrit plot``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import (
    HelpFormatter,
    add_attribution_arguments,
    add_data_arguments,
    add_model_arguments,
    load_data,
    load_model,
)

__all__ = ["add_parsers"]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    mine = subparsers.add_parser(
        "mine", formatter_class=HelpFormatter,
        help="mine the neurons of relevant and irrelevant contexts, and the layers to tune",
        description="Attribute every record's relevant-context and irrelevant-context prompt, count the neurons "
                    "active in each, and select the neuron sets and target layers (fastrit.mine). Resumable: run "
                    "the same command again after an interruption. Under torchrun the records are shared out.",
    )
    mine.add_argument("--out", metavar="DIR", default="mine-output",
                      help="folder for the run's state, neuron_sets.safetensors, summary.json and the plots")
    add_model_arguments(mine)
    add_data_arguments(mine, default_split="train")
    add_attribution_arguments(mine)
    group = mine.add_argument_group("selection")
    group.add_argument("--threshold", type=float, default=0.2,
                       help="a neuron is active in an example when its score >= threshold x the layer's max")
    group.add_argument("--share", type=float, default=0.3,
                       help="a neuron joins a condition's set when active in at least this share of its examples")
    group.add_argument("--top-n", type=int, default=None,
                       help="instead of --share: the N most often active neurons per layer")
    group.add_argument("--target-layers", type=int, default=3,
                       help="how many layers to tune (those with the most relevant-only neurons)")
    mine.add_argument("--max-examples", type=int, default=None, help="mine only the first N records")
    mine.add_argument("--no-progress", action="store_true", help="no progress bar")
    mine.set_defaults(run=run_mine)

    plot = subparsers.add_parser(
        "plot", formatter_class=HelpFormatter,
        help="draw the PNGs of a mined NeuronSets folder",
        description="Write neurons_per_layer.png and activation_shares.png for the NeuronSets saved in DIR.",
    )
    plot.add_argument("dir", metavar="DIR", help="a folder written by `fastrit mine`")
    plot.add_argument("--out", metavar="PATH", default=None,
                      help="a folder, or a .png path used as the name prefix (default: DIR)")
    plot.set_defaults(run=run_plot)


def format_sets_table(sets) -> str:
    """Neurons per layer in each set, one row per layer, target layers starred."""
    sizes = sets.set_sizes()
    header = f"{'layer':>6} {'relevant':>9} {'irrelevant':>11} {'relevant-only':>14} {'irrelevant-only':>16}"
    rows = [header]
    for layer in range(sets.num_layers):
        mark = "*" if layer in sets.target_layers else " "
        rows.append(f"{layer:>5}{mark} {sizes['relevant'][layer]:>9} {sizes['irrelevant'][layer]:>11} "
                    f"{sizes['relevant_exclusive'][layer]:>14} {sizes['irrelevant_exclusive'][layer]:>16}")
    rows.append(f"target layers (* above): {sets.target_layers}; examples: {sets.examples}; skipped: {sets.skipped}")
    return "\n".join(rows)


def run_mine(args: argparse.Namespace) -> None:
    from .. import mining
    from ..mining.miner import check_mine_arguments

    check_mine_arguments(k=args.k, steps=args.steps, method=args.method, objective=args.objective,
                         positions=args.positions, threshold=args.threshold, share=args.share, top_n=args.top_n,
                         target_layers=args.target_layers, batch_size=args.batch_size,
                         max_examples=args.max_examples, max_length=args.max_length, delta_tol=args.delta_tol)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out: {str(out)!r} exists and is not a folder")
    try:  # before the model loads: an unwritable --out fails at once
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"--out: cannot create the folder {str(out)!r}: {error.strerror or error}") from error
    data = load_data(args)
    model, tokenizer = load_model(args)
    sets = mining.mine(
        model, tokenizer, data, out_dir=out, k=args.k, steps=args.steps, method=args.method,
        objective=args.objective, positions=args.positions, threshold=args.threshold, share=args.share,
        top_n=args.top_n, target_layers=args.target_layers, batch_size=args.batch_size,
        max_examples=args.max_examples, progress=not args.no_progress, template=args.template, seed=args.seed,
        max_length=args.max_length, delta_tol=args.delta_tol,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, process 0 reports
        sets.plot(out)
        print(format_sets_table(sets))
        print(f"saved to {out}/ (neuron_sets.safetensors, summary.json, neurons_per_layer.png, activation_shares.png)")


def run_plot(args: argparse.Namespace) -> None:
    from ..mining import NeuronSets

    sets = NeuronSets.load(args.dir)
    for path in sets.plot(args.out or args.dir):
        print(path)
