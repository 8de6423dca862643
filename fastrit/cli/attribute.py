"""``fastrit attribute``: Integrated Gradients of every MLP neuron for one prompt/answer pair or a data file."""

from __future__ import annotations

import argparse

from .. import _args
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
    parser = subparsers.add_parser(
        "attribute", formatter_class=HelpFormatter,
        help="attribute an answer to every MLP neuron (one prompt, or the records of a data file)",
        description="Integrated Gradients of every MLP neuron of every layer (fastrit.attribute), for --prompt "
                    "and --answer, or for the prompts of --data (or the embedded synthetic test split). Prints "
                    "the top neurons per layer (mean score over the examples) and saves the NeuronAttribution.",
    )
    parser.add_argument("--prompt", default=None, help="one prompt (with --answer) instead of a data file")
    parser.add_argument("--answer", default=None, help="the answer the prompt is attributed to")
    parser.add_argument("--out", metavar="FILE", default="attribution.safetensors",
                        help="where the NeuronAttribution is saved (safetensors)")
    parser.add_argument("--top", type=int, default=10, help="neurons printed per layer")
    add_model_arguments(parser)
    add_data_arguments(parser, default_split="test")
    parser.add_argument("--condition", choices=("relevant", "irrelevant", "noisy"), default="relevant",
                        help="passages shown with each record's question (data files only)")
    parser.add_argument("--max-examples", type=int, default=8, help="attribute only the first N records")
    add_attribution_arguments(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if (args.prompt is None) != (args.answer is None):
        raise ValueError("--prompt and --answer: give both, or neither (then records come from --data)")
    if args.prompt is not None and args.data is not None:
        raise ValueError("--data: give either --data or --prompt/--answer, not both")
    if args.max_examples is not None:
        _args.positive("--max-examples", args.max_examples)
    _args.positive("--top", args.top)


def _inputs(args: argparse.Namespace, model, tokenizer) -> dict:
    import torch

    from ..data import encode_pair, prompts

    if args.prompt is not None:
        prompt_ids, answer_ids = encode_pair(tokenizer, args.prompt, args.answer)
        if not answer_ids:
            raise ValueError("--answer: tokenizes to nothing")
        return {"input_ids": torch.tensor([prompt_ids]), "target_ids": torch.tensor([answer_ids])}
    data = load_data(args)
    count = len(data) if args.max_examples is None else min(args.max_examples, len(data))
    batch = prompts(data, tokenizer, condition=args.condition, k=args.k, template=args.template,
                    max_length=args.max_length, seed=args.seed, model=model, indices=range(count))
    if len(batch) == 0:
        raise ValueError(f"--data: no record has a {args.condition!r} prompt (skipped: {batch.skipped})")
    return batch.tensors()


def format_top_neurons(attribution, top: int) -> str:
    """The ``top`` neurons of each layer by mean score over the examples."""
    mean = attribution.scores.mean(dim=0)
    lines = [f"top {top} neurons per layer (mean IG score over {attribution.num_examples} example(s)):"]
    for j, layer in enumerate(attribution.layers):
        values, indices = mean[j].topk(min(top, mean.shape[1]))
        shown = "  ".join(f"{i}:{v:.3g}" for i, v in zip(indices.tolist(), values.tolist(), strict=True))
        steps = ""
        if attribution.settings.get("steps") == "auto" and attribution.steps_used is not None:
            steps = f", steps {attribution.steps_used[:, j].max()}"
        lines.append(f"  layer {layer:>3} (delta {attribution.delta[:, j].abs().max():.2g}{steps}): {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from .. import attribute

    _check(args)
    model, tokenizer = load_model(args)
    result = attribute(model, **_inputs(args, model, tokenizer), objective=args.objective,
                       positions=args.positions, steps=args.steps, method=args.method, delta_tol=args.delta_tol,
                       layers=args.layers, batch_size=args.batch_size, progress=not args.no_progress)
    print(format_top_neurons(result, args.top))
    print(f"saved to {result.save(args.out)}")
