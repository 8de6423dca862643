"""``fastrit demo``: the whole Neuro-RIT pipeline on the embedded default, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import _args
from ._common import HelpFormatter

__all__ = ["add_parsers"]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    from ..demo.pipeline import DemoSettings

    d = DemoSettings()
    parser = subparsers.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="evaluate, mine, prepare, tune (Neuro-RIT and a plain baseline), evaluate, export: on the embedded "
             "reader, with a report",
        description="The embedded reader and its synthetic data through the whole pipeline: exact match before, "
                    "neuron mining, Neuro-RIT's two stages, the same budget spent on a plain baseline, exact match "
                    "after, and the export loaded by plain transformers. Writes report.md, report.json and PNGs.",
    )
    parser.add_argument("--out", metavar="DIR", default="demo-output", help="a new or empty folder for the report")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per Neuro-RIT stage (the "
                                                                   "baseline gets twice as many)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate")
    parser.add_argument("--mine-records", type=int, default=d.mine_records, help="train records mined")
    parser.add_argument("--mine-steps", type=int, default=d.mine_steps, help="IG steps when mining")
    parser.add_argument("--train-records", type=int, default=d.train_records, help="train records tuned on")
    parser.add_argument("--test-records", type=int, default=None, help="test records scored (default: all)")
    parser.add_argument("--export-questions", type=int, default=d.export_questions,
                        help="test questions the export must answer as the tuned model does")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of training and prompts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from ..demo.pipeline import DemoSettings, run_demo
    from ..demo.report import format_table

    for name in ("steps", "batch_size", "mine_records", "mine_steps", "train_records", "export_questions"):
        _args.positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.test_records is not None:
        _args.positive("--test-records", args.test_records)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {args.out!r} exists and is not an empty folder (make demo replaces demo-output)")
    existing = next(folder for folder in out.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"--out: {str(existing)!r} is a file, not a folder")
    settings = DemoSettings(mine_records=args.mine_records, mine_steps=args.mine_steps,
                            train_records=args.train_records, steps=args.steps, batch_size=args.batch_size,
                            learning_rate=args.lr, test_records=args.test_records,
                            export_questions=args.export_questions, seed=args.seed)
    try:
        report = run_demo(args.out, settings, progress=not args.no_progress)
    except OSError as error:  # the folder cannot be made or written: name the option, not the function's argument
        if str(error).startswith("out_dir:"):
            raise OSError(f"--out:{str(error).removeprefix('out_dir:')}") from error
        raise
    print(format_table(report))
    print(f"report: {args.out}/report.md, report.json, em.png, neurons_per_layer.png, activation_shares.png, "
          f"training_loss.png; the export: {args.out}/export")
