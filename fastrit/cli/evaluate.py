"""``fastrit eval``: accuracy, exact match, token F1 and abstention of a model's greedy answers per context
condition (fastrit.evaluate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import _args
from .._io import write_text_atomic
from ..data import CONDITIONS
from ._common import (
    HelpFormatter,
    add_data_arguments,
    add_delta_argument,
    add_model_arguments,
    delta_path,
    load_data,
    load_model,
)

__all__ = ["add_parsers"]


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="accuracy and exact match of a model's answers with relevant, noisy or irrelevant passages",
        description="fastrit.evaluate: greedy answers to each record's prompt in every condition, scored against "
                    "the gold answers (SQuAD-normalised): accuracy (a gold answer contained in the answer, what RAG "
                    "robustness papers report), exact match, token F1, and the share of answers that abstain. "
                    "Prompts use the tokenizer's chat template when it has one (--template to choose). With "
                    "--delta, the model as fastrit prepared and tuned it.",
    )
    add_model_arguments(parser)
    add_delta_argument(parser)
    add_data_arguments(parser, default_split="test", max_length=False)
    parser.add_argument("--conditions", default="relevant,noisy",
                        help=f"comma-separated, among {', '.join(CONDITIONS)}")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--answer-marker", default=None,
                        help="score what follows this marker (e.g. 'Answer:' for a model tuned to write its "
                             "evidence first; give --max-new-tokens room for the evidence); default: the whole "
                             "continuation")
    parser.add_argument("--stop-at-newline", action="store_true",
                        help="score only the first line of each answer (after the marker, if any)")
    parser.add_argument("--max-examples", type=int, default=None, help="only the first N records")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="also write the scores to this JSON file: \"scores\" per condition (accuracy, em, f1, "
                             "abstain, n), \"em\" per condition, the settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    from .. import data as rag
    from ..evaluate import evaluate
    from ..tuning import load_delta

    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    if not conditions or any(c not in CONDITIONS for c in conditions):
        raise ValueError(f"--conditions: expected names among {CONDITIONS}, got {args.conditions!r}")
    if args.max_examples is not None:
        _args.positive("--max-examples", args.max_examples)
    delta = delta_path(args.delta) if args.delta is not None else None
    out = Path(args.out) if args.out is not None else None
    if out is not None and not out.parent.is_dir():
        raise FileNotFoundError(f"--out: no such folder: {str(out.parent)!r}")
    data = load_data(args)
    if args.max_examples is not None:
        data = rag.RagData(data.records.select(range(min(args.max_examples, len(data)))))
    model, tokenizer = load_model(args)
    if delta is not None:
        load_delta(model, delta)
    scores = evaluate(model, tokenizer, data, conditions=conditions, k=args.k, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, template=args.template, seed=args.seed,
                      progress=not args.no_progress, answer_marker=args.answer_marker,
                      stop_at_newline=args.stop_at_newline)
    print(format_scores(scores))
    print(f"{len(data)} records, k={args.k}")
    if out is not None:
        write_text_atomic(out, json.dumps({
            "scores": scores, "em": {condition: row["em"] for condition, row in scores.items()},
            "records": len(data), "k": args.k, "delta": None if delta is None else str(delta),
            "answer_marker": args.answer_marker, "stop_at_newline": args.stop_at_newline,
        }, indent=1) + "\n")
        print(f"saved to {out}")


def format_scores(scores: dict[str, dict]) -> str:
    """One row per condition: accuracy, EM, F1, abstain and the records scored."""
    lines = [f"{'condition':>10}  {'accuracy':>8}  {'EM':>6}  {'F1':>6}  {'abstain':>7}  {'n':>6}"]
    for condition, row in scores.items():
        lines.append(f"{condition:>10}  {row['accuracy']:>8.4f}  {row['em']:>6.4f}  {row['f1']:>6.4f}  "
                     f"{row['abstain']:>7.4f}  {row['n']:>6d}")
    return "\n".join(lines)
