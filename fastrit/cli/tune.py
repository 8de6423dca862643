"""``fastrit tune`` (prepare, then Neuro-RIT's two stages) and ``fastrit plan`` (the memory a run or an attribution will
take)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import _args
from ..tuning.stages import STAGES, check_stage_names
from ._common import (
    HelpFormatter,
    add_data_arguments,
    add_memory_arguments,
    add_model_arguments,
    add_prepare_arguments,
    load_data,
    load_model,
    memory_settings,
    prepare_settings,
    steps_argument,
)

__all__ = ["add_parsers", "per_stage"]

def per_stage(kind):
    """An argparse type: ``VALUE`` for every stage, or ``denoise=VALUE,distill=VALUE``."""

    def parse(text: str):
        if "=" not in text:
            return kind(text)
        values = {}
        for part in text.split(","):
            stage, _, value = part.partition("=")
            if stage.strip() not in STAGES:
                raise argparse.ArgumentTypeError(f"unknown stage {stage.strip()!r}; expected {STAGES}")
            values[stage.strip()] = kind(value)
        return values

    parse.__name__ = kind.__name__
    return parse


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    tune = subparsers.add_parser(
        "tune", formatter_class=HelpFormatter,
        help="prepare a model and run Neuro-RIT's two training stages",
        description="fastrit.prepare (deactivate the irrelevant-exclusive neurons that leave 98 %% of the first 8 "
                    "training prompts' next tokens as they were, freeze the rest, in NF4 only when training would "
                    "not fit otherwise, make the "
                    "target layers trainable), then stage 1 'denoise' (answers on noisy-context prompts) and stage 2 "
                    "'distill' (evidence sentence, then answer) with a transformers Trainer. Resumable: run the same "
                    "command again after an interruption. Per-stage values: VALUE or denoise=VALUE,distill=VALUE.",
    )
    tune.add_argument("--out", metavar="DIR", default="tune-output",
                      help="folder for the stages' checkpoints, their deltas and eval_loss.json")
    add_model_arguments(tune)
    add_data_arguments(tune, default_split="train")
    tune.add_argument("--eval-data", metavar="FILE", default=None,
                      help="held-out records (a file, or 'dev' for the embedded dev split) whose noisy-context "
                           "answer loss is measured before and after each stage: 16 sampled continuations per "
                           "record, minutes for a real model on a CPU (default: no measurement)")
    tune.add_argument("--eval-records", type=int, default=None, metavar="N",
                      help="measure on the first N records of --eval-data only")
    add_prepare_arguments(tune)
    group = tune.add_argument_group("training (per stage)")
    group.add_argument("--stages", default="denoise,distill", help="the stages to run, in order")
    group.add_argument("--epochs", type=per_stage(float), default=1.0, help="epochs over the stage's examples")
    group.add_argument("--max-steps", type=per_stage(int), default=-1,
                       help="optimizer steps per stage; > 0 overrides --epochs")
    group.add_argument("--lr", type=per_stage(float), default=1e-4, help="peak learning rate")
    group.add_argument("--batch-size", type=per_stage(int), default=8, help="examples per device and step")
    group.add_argument("--grad-accum", type=per_stage(int), default=1, help="gradient accumulation steps")
    group.add_argument("--warmup", type=per_stage(float), default=0.05,
                       help="linear warmup: a fraction of the steps (< 1) or a step count")
    group.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit",
                       help="bitsandbytes 8-bit AdamW (paged on CUDA) or torch AdamW")
    group.add_argument("--save-steps", type=int, default=100, help="checkpoint interval, in optimizer steps")
    group.add_argument("--logging-steps", type=int, default=10, help="logging interval, in optimizer steps")
    tune.add_argument("--export", metavar="DIR", default=None,
                      help="also write the tuned model as a plain transformers checkpoint (fastrit.export)")
    tune.add_argument("--no-progress", action="store_true", help="no progress bars")
    tune.set_defaults(run=run_tune)

    plan = subparsers.add_parser(
        "plan", formatter_class=HelpFormatter,
        help="predict the memory of a training run or an attribution, before loading anything",
        description="fastrit.plan_memory for a built-in model (llama-3-8b, mistral-7b, qwen2-7b, gemma-2-9b) or a "
                    "config.json / model folder, beside the plain way (dense weights, the same parameters "
                    "trainable in the model's dtype, torch AdamW, no checkpointing, the model's own loss). With "
                    "--attribute: fastrit.plan_attribution, the peak of fastrit.attribute on one example (every "
                    "layer, the default batch size).",
    )
    plan.add_argument("config", metavar="CONFIG", help="a built-in name, a config.json, or a model folder")
    plan.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    plan.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    plan.add_argument("--train", choices=("mlp", "neurons", "lora"), default="mlp", help="what trains")
    plan.add_argument("--train-layers", type=int, default=3, help="how many target layers")
    plan.add_argument("--neurons", type=int, default=None, help="--train neurons: trainable neurons per layer")
    add_memory_arguments(plan, "--quantize-frozen", "0.9 x the free memory of --device on this machine; where "
                         "there is none, the setting with the least memory")
    plan.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit", help="optimizer")
    plan.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                      help="dtype of the weights that are not NF4")
    plan.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                      help="where the step runs (bitsandbytes' 8-bit AdamW needs a float32 workspace on CPU)")
    group = plan.add_argument_group("attribution (--attribute)")
    group.add_argument("--attribute", action="store_true",
                       help="plan fastrit.attribute instead of a training step (the training options are ignored)")
    group.add_argument("--tokens", type=int, default=512, help="prompt tokens")
    group.add_argument("--answer-tokens", type=int, default=1, help="answer tokens")
    group.add_argument("--steps", type=steps_argument, default=20, help="integration points per layer, or 'auto'")
    group.add_argument("--positions", choices=("last", "answer", "all"), default="last", help="scaled positions")
    plan.set_defaults(run=run_plan)


def run_tune(args: argparse.Namespace) -> None:
    import fastrit
    from fastrit import demo

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    check_stage_names("--stages", stages, given=args.stages)
    sets, prepare_kwargs = prepare_settings(args)
    data = load_data(args)
    eval_data = None
    if args.eval_records is not None and args.eval_data is None:
        raise ValueError("--eval-records: give --eval-data too")
    if args.eval_data is not None:
        eval_data = demo.load_data("dev") if args.eval_data == "dev" else fastrit.data.load(args.eval_data)
        if args.eval_records is not None:
            _args.positive("--eval-records", args.eval_records)
            eval_data = fastrit.data.RagData(eval_data.records.select(range(min(args.eval_records,
                                                                                len(eval_data)))))
    model, tokenizer = load_model(args)
    fastrit.tune(model, tokenizer, data, sets, output_dir=args.out, stages=stages, epochs=args.epochs,
                 learning_rate=args.lr, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                 warmup=args.warmup, max_steps=args.max_steps, optimizer=args.optimizer, save_steps=args.save_steps,
                 logging_steps=args.logging_steps, seed=args.seed, k=args.k, template=args.template,
                 max_length=args.max_length, progress=not args.no_progress, eval_data=eval_data, **prepare_kwargs)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, process 0 reports and exports
        return
    fastrit.trainable_summary(model)
    losses = Path(args.out) / "eval_loss.json"
    if losses.is_file():
        print(f"noisy-context answer loss: {losses.read_text().strip()}")
    if args.export is not None:
        fastrit.export(model, args.export, tokenizer=tokenizer)
        print(f"exported to {args.export}")


def _config(text: str):
    import transformers

    from ..tuning.plan import BUILT_IN_CONFIGS

    if text in BUILT_IN_CONFIGS:
        return text
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"CONFIG: not a built-in name ({', '.join(sorted(BUILT_IN_CONFIGS))}) and no such "
                                f"file or folder: {text!r}")
    return transformers.AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def run_plan(args: argparse.Namespace) -> None:
    from ..tuning.auto import choose_settings
    from ..tuning.loss import loss_chunk_bytes
    from ..tuning.plan import plan_memory

    config = _config(args.config)
    if args.attribute:
        _print_attribution_plan(args, config)
        return
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, train=args.train,
                  train_layers=args.train_layers, neurons=args.neurons, dtype=args.dtype, device=args.device)
    common["master_weights"] = not args.no_master_weights
    quantize, checkpointing, budget = memory_settings(args, args.quantize_frozen, "--quantize-frozen")
    if "auto" in (quantize, checkpointing):
        budget, source = _plan_budget(args.device, budget)
        if budget and args.device == "cuda":  # the loss chunk causal_lm_loss takes on a GPU of that memory
            common["loss_chunk_bytes"] = loss_chunk_bytes(budget)
        choice = choose_settings(config, budget=budget, budget_source=source, quantize_frozen=quantize,
                                 gradient_checkpointing=checkpointing, optimizer=args.optimizer, **common)
        ours = choice.plan
        print(f"settings: {choice.why}")
    else:
        ours = plan_memory(config, quantize_frozen=quantize, optimizer=args.optimizer,
                           gradient_checkpointing=checkpointing, **common)
    plain = plan_memory(config, quantize_frozen=None, optimizer="adamw", gradient_checkpointing=False, loss="model",
                        **{**common, "master_weights": False})
    width = max(len(k) for k in ours.breakdown)
    print(f"{args.config}: seq {args.seq_len} x batch {args.batch_size}, train={args.train}, "
          f"{args.train_layers} target layers, {ours.trainable_params:,} trainable parameters")
    print(f"{'':<{width}}  {'fastrit':>11}  {'plain way':>11}")
    for name in ours.breakdown:
        print(f"{name:<{width}}  {ours.breakdown[name] / 2**30:7.3f} GiB  {plain.breakdown[name] / 2**30:7.3f} GiB")
    print(f"{'peak':<{width}}  {ours.peak_gib:7.3f} GiB  {plain.peak_gib:7.3f} GiB")


def _plan_budget(device: str, memory_budget: int | None) -> tuple[int, str]:
    """``(bytes, where they come from)`` for ``fastrit plan``'s "auto" settings (see ``--memory-budget``)."""
    import torch

    from ..tuning.auto import FIT_MARGIN, available_memory, size_text

    if memory_budget is not None:
        return memory_budget, f"--memory-budget {size_text(memory_budget)}"
    if device == "cuda" and not torch.cuda.is_available():
        return 0, "no budget (no --memory-budget, and no CUDA device here)"
    budget = int(FIT_MARGIN * available_memory(torch.device(device)))
    return budget, f"the free {device} memory here ({size_text(budget)}, x{FIT_MARGIN})"


def _print_attribution_plan(args: argparse.Namespace, config) -> None:
    from ..attribution.plan import plan_attribution

    plan = plan_attribution(config, tokens=args.tokens, answer_tokens=args.answer_tokens, steps=args.steps,
                            positions=args.positions, dtype=args.dtype, device=args.device)
    settings = plan.settings
    print(f"{args.config}: fastrit.attribute on {args.tokens} prompt + {args.answer_tokens} answer tokens, "
          f"steps {args.steps}, positions {args.positions!r}, {len(settings['layers'])} layers, {args.dtype} on "
          f"{args.device}: chunks of {settings['chunk_rows']} of {settings['rows']} IG rows, "
          f"{settings['recomputed_tokens']} recomputed token{'s' if settings['recomputed_tokens'] > 1 else ''} each")
    print(plan.table())
