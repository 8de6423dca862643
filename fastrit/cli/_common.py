"""Arguments and loaders that several subcommands share: the model, the data, the attribution settings."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .. import _args
from ..attribution import METHODS

__all__ = [
    "HelpFormatter", "add_attribution_arguments", "add_data_arguments", "add_delta_argument", "add_model_arguments",
    "add_prepare_arguments", "delta_path", "load_data", "load_model", "prepare_settings",
]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each argument's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="PATH_OR_NAME", default=None,
                       help="a transformers causal LM: a folder, a hub name, or a .gguf file (llama.cpp's format; "
                            "converted once into $FASTRIT_CACHE or ~/.cache/fastrit; needs `pip install gguf`); "
                            "default: the embedded reader model")
    group.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype ('auto': as saved)")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available, else cpu; under torchrun each "
                            "process takes cuda:LOCAL_RANK)")
    group.add_argument("--load-in-4bit", action="store_true",
                       help="load the weights in bitsandbytes NF4 (4-bit) to save memory")


def add_data_arguments(parser: argparse.ArgumentParser, *, default_split: str = "train",
                       max_length: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="FILE", default=None,
                       help="RAG QA records: .jsonl, .json or .parquet (question, answers, ctxs); default: the "
                            f"embedded synthetic {default_split} split")
    group.add_argument("--k", type=int, default=5, help="passages per prompt")
    group.add_argument("--template", default=None,
                       help="prompt template: a format string with {passages} and {question}, or 'chat' "
                            "(default: the tokenizer's chat template when it has one, else 'Passage: ... "
                            "Question: ... Answer:')")
    group.add_argument("--seed", type=int, default=0, help="seed of the passage shuffling in prompts")
    if max_length:
        group.add_argument("--max-length", type=int, default=None,
                           help="longest prompt + answer in tokens (default: the model's maximum positions)")
    parser.set_defaults(default_split=default_split)


def steps_argument(text: str) -> int | str:
    """An argparse type for ``--steps``: an integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def add_attribution_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("attribution (Integrated Gradients)")
    group.add_argument("--steps", type=steps_argument, default=20,
                       help="integration points, or 'auto': per layer the fewest Gauss-Legendre points (4, 8, ... 64) "
                            "whose completeness error is within --delta-tol")
    group.add_argument("--method", choices=METHODS, default=None,
                       help="integration rule (Captum's; default riemann_right, gausslegendre with --steps auto)")
    group.add_argument("--delta-tol", type=float, default=None,
                       help="--steps auto: the completeness error allowed, as a fraction of |F(a) - F(0)| "
                            "(default 0.005)")
    group.add_argument("--objective", choices=("logprob", "prob"), default="logprob",
                       help="logprob: sum of the answer tokens' log-probabilities; prob: p(first answer token)")
    group.add_argument("--positions", choices=("last", "answer", "all"), default="last",
                       help="where neurons are scored: the last prompt token, the answer-predicting positions, "
                            "or every position")
    group.add_argument("--batch-size", type=int, default=None,
                       help="most IG rows per forward (default: as many as fit a 2 GiB activation budget)")


def _device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name} asked for, but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` / ``--dtype`` / ``--device`` / ``--load-in-4bit``.

    ``--model`` goes through :func:`fastrit.models.load_causal_lm`: a folder, a hub name, or a ``.gguf`` file
    (converted once into ``$FASTRIT_CACHE`` or ``~/.cache/fastrit``); its errors name ``--model``.
    """
    import torch

    from ..models import load_causal_lm

    device = _device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model is None:
        from .. import demo

        source = demo.READER_DIR
    else:
        source = args.model
    try:
        return load_causal_lm(source, dtype=dtype, device=device, load_in_4bit=args.load_in_4bit)
    except (OSError, ValueError, TypeError, ImportError) as error:
        message = str(error)
        if not message.startswith("source:"):
            raise
        message = "--model:" + message[len("source:"):]
        # a missing gguf package is a user error too: one line, not a traceback
        raise (OSError(message) if isinstance(error, ImportError) else type(error)(message)) from error


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from error


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """What fastrit.prepare does to the model: the neuron sets, what trains, NF4, checkpointing."""
    parser.add_argument("--neuron-sets", metavar="DIR", default=None,
                        help="a folder written by `fastrit mine` (deactivated neurons, target layers, trainable "
                             "neurons); without it give --train-layers, and nothing is deactivated")
    group = parser.add_argument_group("what trains")
    group.add_argument("--train", choices=("mlp", "neurons", "lora"), default="mlp",
                       help="the target layers' MLPs, only their chosen neurons, or LoRA adapters on them")
    group.add_argument("--train-layers", type=_layers, default=None, metavar="L,L,...",
                       help="the target layers (default: the neuron sets' target layers)")
    add_memory_arguments(group, "--quantize", "0.9 x the device's available memory plus what the model holds")
    group.add_argument("--no-quantize", action="store_true", help="the same as --quantize none")


def add_memory_arguments(group, quantize_flag: str, default_budget: str) -> None:
    """The settings fastrit.prepare can choose from the memory: ``quantize_flag`` (NF4 or not), ``--checkpointing``
    / ``--no-checkpointing`` and ``--memory-budget`` (whose default is described by ``default_budget``)."""
    group.add_argument(quantize_flag, choices=("auto", "nf4", "none"), default="auto",
                       help="the frozen layers: NF4, their dtype, or 'auto': chosen with --checkpointing from the "
                            "memory: the model's dtype without checkpointing when a training step fits, then with "
                            "it, then NF4 without, then NF4 with")
    group.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                       help=f"gradient checkpointing of the decoder layers; 'auto': chosen with {quantize_flag}")
    group.add_argument("--no-checkpointing", action="store_true", help="the same as --checkpointing off")
    group.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                       help=f"memory the run may use, in GiB, for the 'auto' settings (default: {default_budget})")
    group.add_argument("--no-master-weights", action="store_true",
                       help="train a bf16/fp16 model's tensors in its dtype, not as float32 master weights")


def memory_settings(args: argparse.Namespace, quantize: str,
                    quantize_flag: str) -> tuple[str | None, bool | str, int | None]:
    """``(quantize_frozen, gradient_checkpointing, memory_budget in bytes or None)`` from :func:`add_memory_arguments`'
    options, ``quantize`` being the value of ``quantize_flag`` ("auto", "nf4" or "none"); checked."""
    if args.no_checkpointing and args.checkpointing != "auto":
        raise ValueError(f"--no-checkpointing: conflicts with --checkpointing {args.checkpointing}; give one of them")
    checkpointing = False if args.no_checkpointing else {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    budget = None
    if args.memory_budget is not None:
        if "auto" not in (quantize, checkpointing):
            raise ValueError(f"--memory-budget: only the 'auto' settings ({quantize_flag}, --checkpointing) use it")
        _args.number("--memory-budget", args.memory_budget, low=0, high=math.inf, high_open=True,
                     what="a positive number of GiB")
        budget = int(args.memory_budget * 2**30)
    return (None if quantize == "none" else quantize), checkpointing, budget


def prepare_settings(args: argparse.Namespace):
    """``(neuron_sets or None, fastrit.prepare keyword arguments)`` from :func:`add_prepare_arguments`' options."""
    from ..mining import NeuronSets

    sets = None
    if args.neuron_sets is not None:
        if not Path(args.neuron_sets).is_dir():
            raise FileNotFoundError(f"--neuron-sets: no such folder: {args.neuron_sets!r}")
        sets = NeuronSets.load(args.neuron_sets)
    elif args.train_layers is None:
        raise ValueError("--train-layers: give the layers to train, or --neuron-sets to take its target layers")
    if args.no_quantize and args.quantize != "auto":
        raise ValueError(f"--no-quantize: conflicts with --quantize {args.quantize}; give one of them")
    quantize, checkpointing, budget = memory_settings(args, "none" if args.no_quantize else args.quantize,
                                                      "--quantize")
    kwargs = dict(train=args.train, quantize_frozen=quantize, gradient_checkpointing=checkpointing,
                  master_weights=not args.no_master_weights)
    if budget is not None:
        kwargs["memory_budget"] = budget
    if args.train_layers is not None:
        kwargs["train_layers"] = args.train_layers
    if sets is None:
        kwargs["deactivate"] = None
    return sets, kwargs


def add_delta_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--delta", metavar="PATH", required=required, default=None,
                        help="what fastrit changed in the model: a delta file (fastrit.save_delta, `fastrit prepare`) "
                             "or a `fastrit tune` output folder (its last finished stage)"
                             + ("" if required else "; default: the model as it is"))


def delta_path(path: str) -> Path:
    """The delta file named by ``--delta``: the file itself, or the last finished stage's delta in a tune folder."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_dir():
        raise FileNotFoundError(f"--delta: no such file or folder: {path!r}")
    stages = sorted(candidate.glob("*-*/delta.safetensors"), key=lambda p: int(p.parent.name.split("-")[0])
                    if p.parent.name.split("-")[0].isdigit() else -1)
    if not stages:
        raise FileNotFoundError(f"--delta: {path!r} holds no finished `fastrit tune` stage (no */delta.safetensors)")
    return stages[-1]


def load_data(args: argparse.Namespace):
    """The RagData of ``--data``, or the embedded synthetic split."""
    from .. import data, demo

    if args.data is None:
        return demo.load_data(args.default_split)
    return data.load(args.data)
