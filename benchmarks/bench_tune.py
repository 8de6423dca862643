"""Two-stage Neuro-RIT tuning of the embedded reader on its synthetic data: the noisy-context answer loss on dev
prompts before tuning, after stage 1 (denoise) and after stage 2 (distill), and the time of each phase.

Pipeline: ``fastrit.mine`` on ``--mine-records`` train records (IG, ``--mine-steps`` steps) -> ``fastrit.tune``
with prepare's defaults (deactivate the irrelevant-exclusive neurons, train the target layers' MLPs, frozen
layers in NF4) on ``--train-records`` train records, ``--steps`` optimizer steps per stage (batch 16, lr 1e-3,
8-bit AdamW), the loss measured on the noisy-context prompts of ``--dev-records`` dev records: the answer right
after the prompt at every point (before, after denoise, after distill), and after distill also the answer after the
model's own evidence (it was trained to write ``Evidence: ... Answer: ...``; fastrit.tuning.answer_loss_after_evidence).
At every point also the answer loss with the model's own evidence marginalised by sampling, the answer right after
the prompt included (fastrit.tuning.metrics.answer_loss_over_own_evidence: the loss in whichever of the two formats
the model answers). Before and after both stages, the answer loss with the evidence marginalised over the passage
sentences (fastrit.tuning.metrics.answer_loss_over_evidence, exact but blind to evidence in the model's own words),
and the greedy noisy exact match (fastrit.evaluate, the answer after the marker when the model writes one).
Results: ``benchmarks/results/bench_tune.json``. Run: ``python -m benchmarks.bench_tune``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

import fastrit
from fastrit import data, demo
from fastrit.tuning.metrics import answer_loss_over_evidence

RESULTS = Path(__file__).parent / "results"


def _subset(split: str, n: int) -> data.RagData:
    """The first ``n`` records of ``split``; refuses more than the split has (its size is fixed)."""
    full = demo.load_data(split)
    if n > len(full):
        raise ValueError(f"{split} records: the {split} split has {len(full)}, {n} asked for")
    return data.RagData(full.records.select(range(n)))


def _noisy_exact_match(model, tokenizer, dev: data.RagData, seed: int) -> float:
    """Greedy exact match on the noisy-context prompts, the answer read after the answer marker when the model writes
    one (``fastrit.evaluate``, room for evidence before the answer)."""
    return fastrit.evaluate(model, tokenizer, dev, conditions=("noisy",), max_new_tokens=64,
                            answer_marker=data.ANSWER_MARKER, seed=seed)["noisy"]["em"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few records and steps (a smoke run)")
    parser.add_argument("--mine-records", type=int, default=400)
    parser.add_argument("--mine-steps", type=int, default=8)
    parser.add_argument("--train-records", type=int, default=4000)
    parser.add_argument("--dev-records", type=int, default=300, help="at most the dev split's 300")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    parser.add_argument("--seed", type=int, default=0,
                        help="tune's seed (data order) and the passage order of every prompt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.mine_records, args.mine_steps, args.train_records, args.dev_records, args.steps = 16, 2, 64, 16, 2
    torch.manual_seed(args.seed)
    model, tokenizer = demo.load_model()
    dev = _subset("dev", args.dev_records)
    over_evidence = {"before": answer_loss_over_evidence(model, tokenizer, dev, seed=args.seed)}
    exact_match = {"before": _noisy_exact_match(model, tokenizer, dev, args.seed)}
    seconds = {}
    start = time.perf_counter()
    sets = fastrit.mine(model, tokenizer, _subset("train", args.mine_records), steps=args.mine_steps,
                        progress=False)
    seconds["mine"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fastrit.tune(model, tokenizer, _subset("train", args.train_records), sets, output_dir=Path(tmp) / "run",
                     max_steps=args.steps, batch_size=16, learning_rate=1e-3, warmup=0.1, save_steps=10**6,
                     logging_steps=max(1, args.steps // 5), eval_data=dev, seed=args.seed,
                     progress=False)
        seconds["tune"] = time.perf_counter() - start
        losses = json.loads((Path(tmp) / "run" / "eval_loss.json").read_text())
    over_evidence["distill"] = answer_loss_over_evidence(model, tokenizer, dev, seed=args.seed)
    exact_match["distill"] = _noisy_exact_match(model, tokenizer, dev, args.seed)
    summary = fastrit.trainable_summary(model, print_table=False)
    result = {
        "noisy_answer_loss": losses, "noisy_answer_loss_over_evidence": over_evidence,
        "noisy_exact_match": exact_match, "seconds": seconds,
        "target_layers": sets.target_layers,
        "deactivated": summary["total"]["deactivated_neurons"], "trainable_params": summary["total"]["trainable"],
        "settings": vars(args) | {"out": str(args.out)},
        "env": {"platform": platform.platform(), "torch": metadata.version("torch"),
                "transformers": metadata.version("transformers"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    after = {point: losses[point]["answer_after_prompt"] for point in ("before", "denoise", "distill")}
    print(f"noisy-context answer loss on {args.dev_records} dev records, the answer right after the prompt: "
          f"before {after['before']:.4f}, after denoise {after['denoise']:.4f}, after distill {after['distill']:.4f}")
    print(f"after distill, the answer after the model's own evidence: "
          f"{losses['distill']['answer_after_own_evidence']:.4f} (it wrote the answer marker itself in "
          f"{losses['distill']['marker_written']:.0%} of the prompts)")
    own = {point: losses[point]["answer_over_own_evidence"] for point in ("before", "denoise", "distill")}
    print(f"the answer loss with the model's own evidence marginalised (sampled; the answer right after the prompt "
          f"included): before {own['before']:.4f}, after denoise {own['denoise']:.4f}, after distill "
          f"{own['distill']:.4f}")
    print(f"the answer loss with the evidence marginalised over the passage sentences: before "
          f"{over_evidence['before']:.4f}, after both stages {over_evidence['distill']:.4f}")
    print(f"noisy exact match (the answer after the marker when the model writes one): before "
          f"{exact_match['before']:.3f}, after both stages {exact_match['distill']:.3f}")
    print(f"target layers {sets.target_layers}, {result['deactivated']} neurons deactivated, "
          f"{result['trainable_params']:,} trainable; mine {seconds['mine']:.0f} s, tune {seconds['tune']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_tune_quick.json" if args.quick else "bench_tune.json"
    if args.seed != 0:
        name = name.replace(".json", f"_seed{args.seed}.json")
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
