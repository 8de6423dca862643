"""Mining throughput: examples per second of ``fastrit.mine``, and what its bookkeeping costs beside attribution.

Two models (``--quick`` shrinks the record counts):

- ``reader``: the embedded reader (3 layers, hidden 128, MLP 512) on its synthetic train split, k = 5;
- ``bench``: the attribution benchmark's shape (8 layers, hidden 256, MLP 704, random weights, seed 0) with a
  word-level tokenizer over the synthetic world, prompts made about 512 tokens long by a fixed instruction
  preamble in the template (max_length 512).

Providers, interleaved over ``--repeats`` rounds (wall-clock medians):

- ``attribution only``: ``fastrit.attribute`` on the same prompts, tokenized and padded beforehand, in the
  same batches mining uses (chunks of CHUNK_RECORDS records, each condition);
- ``mine``: ``fastrit.mine`` from the records (prompts, attribution, statistics, selection), no out_dir;
- ``mine --out``: the same, saving every chunk, the running total and the result to a fresh folder.

Bookkeeping is measured inside each mining run: the run's wall time minus the time spent inside its own
``fastrit.attribute`` calls, over the latter (``bookkeeping_in_run``; the median over the runs). Measured within
one run, it does not move with the speed of a shared machine between runs; ``bookkeeping_vs_attribution_only``
compares the medians of separate runs instead. Both conditions count as examples (2 per record).
Results: ``benchmarks/results/bench_mining.{json,csv,png}``. Run: ``python -m benchmarks.bench_mining``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fastrit
from fastrit import data, demo
from fastrit.data import world
from fastrit.data.prompts import DEFAULT_TEMPLATE
from fastrit.demo.pretrain import TEMPLATE_WORDS, word_tokenizer
from fastrit.mining import CHUNK_RECORDS, MINED_CONDITIONS, miner

RESULTS = Path(__file__).parent / "results"
STEPS = 20
PREAMBLE_WORDS = "Use only the passages below to answer the question , and answer with a few words .".split()
# about 420 tokens of instruction: with the passages, prompts of about 512 tokens (truncated to 512)
PREAMBLE = " ".join(PREAMBLE_WORDS * 26)


def reader_case(records: int) -> dict:
    model, tokenizer = demo.load_model()
    return {"name": "reader", "model": model, "tokenizer": tokenizer, "data": demo.load_data("train"),
            "records": records, "mine": {}}


def bench_case(records: int) -> dict:
    tokenizer = word_tokenizer([*world.vocabulary(), *TEMPLATE_WORDS, *PREAMBLE_WORDS], model_max_length=1024)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    template = PREAMBLE + "\n" + DEFAULT_TEMPLATE
    return {"name": "bench", "model": model, "tokenizer": tokenizer,
            "data": data.synthetic(records, split="train", seed=0, k=5), "records": records,
            "mine": {"template": template, "max_length": 512}}


def pretokenized(case: dict) -> tuple[list[dict], dict]:
    """The batches mining attributes (per chunk, per condition), and the mean prompt length per condition."""
    batches, lengths = [], {c: [] for c in MINED_CONDITIONS}
    max_length = case["mine"].get("max_length")
    for start in range(0, case["records"], CHUNK_RECORDS):
        chunk = range(start, min(start + CHUNK_RECORDS, case["records"]))
        for condition in MINED_CONDITIONS:
            prompts = data.prompts(case["data"], case["tokenizer"], condition=condition, k=5, indices=chunk,
                                   template=case["mine"].get("template"), model=case["model"],
                                   max_length=max_length)
            lengths[condition] += [len(p) for p in prompts.prompt_ids]
            batches.append(prompts.tensors())
    return batches, {c: statistics.mean(v) for c, v in lengths.items()}


class AttributionClock:
    """Wraps the ``fastrit.attribute`` that mining calls, adding up the seconds spent inside it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._attribute = miner.attribute

    def __enter__(self) -> AttributionClock:
        def timed_attribute(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._attribute(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        miner.attribute = timed_attribute
        return self

    def __exit__(self, *exc) -> None:
        miner.attribute = self._attribute


def timed(fn) -> tuple[float, float | None]:
    """``(wall seconds, seconds inside mining's attribute calls or None)``."""
    with AttributionClock() as clock:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall, (clock.seconds or None)


def run_case(case: dict, repeats: int) -> list[dict]:
    model, tokenizer = case["model"], case["tokenizer"]
    batches, lengths = pretokenized(case)
    examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    print(f"{case['name']}: {case['records']} records, {examples} examples, mean prompt tokens "
          + ", ".join(f"{c} {n:.0f}" for c, n in lengths.items()), flush=True)

    def attribution_only():
        for batch in batches:
            fastrit.attribute(model, **batch, steps=STEPS)

    def mine():
        fastrit.mine(model, tokenizer, case["data"], max_examples=case["records"], steps=STEPS, progress=False,
                     **case["mine"])

    def mine_to_disk():
        with tempfile.TemporaryDirectory() as folder:
            fastrit.mine(model, tokenizer, case["data"], max_examples=case["records"], steps=STEPS, progress=False,
                         out_dir=folder, **case["mine"])

    providers = {"attribution only": attribution_only, "mine": mine, "mine --out": mine_to_disk}
    times = {name: [] for name in providers}
    in_run = {name: [] for name in providers}
    for _ in range(repeats):
        for name, fn in providers.items():
            wall, attributing = timed(fn)
            times[name].append(wall)
            if attributing:
                in_run[name].append((wall - attributing) / attributing)
    rows = []
    attribution = statistics.median(times["attribution only"])
    for name, values in times.items():
        median = statistics.median(values)
        bookkeeping = statistics.median(in_run[name]) if in_run[name] else None
        rows.append({"model": case["name"], "provider": name, "records": case["records"], "examples": examples,
                     "mean_prompt_tokens": lengths, "median_s": median, "min_s": min(values), "max_s": max(values),
                     "runs": len(values), "examples_per_s": examples / median,
                     "bookkeeping_in_run": bookkeeping,
                     "bookkeeping_vs_attribution_only": (median - attribution) / attribution})
        in_run_text = f"{100 * bookkeeping:5.1f} % in the run" if bookkeeping is not None else " " * 17
        print(f"  {name:18s} {median:8.2f} s  {examples / median:7.1f} examples/s  bookkeeping {in_run_text}, "
              f"{100 * (median - attribution) / attribution:+6.1f} % vs attribution only", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    colours = {"attribution only": "#4c72b0", "mine": "#55a868", "mine --out": "#dd8452"}
    width = 0.25
    for j, provider in enumerate(colours):
        values = [next(r["examples_per_s"] for r in rows if r["model"] == m and r["provider"] == provider)
                  for m in models]
        axes.bar([i + (j - 1) * width for i in range(len(models))], values, width, label=provider,
                 color=colours[provider])
    axes.set_xticks(range(len(models)), [f"{m}\n({next(r['examples'] for r in rows if r['model'] == m)} examples)"
                                         for m in models])
    axes.set_ylabel("examples per second (higher is better)")
    axes.set_title(f"fastrit.mine throughput, {STEPS} IG steps, all layers, CPU", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few records (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per provider")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    reader_records, bench_records = (16, 4) if args.quick else (208, 32)
    rows = []
    for case in (reader_case(reader_records), bench_case(bench_records)):
        rows += run_case(case, args.repeats)
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"machine": platform.machine(), "cpu_count": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "fastrit": fastrit.__version__,
           "steps": STEPS, "chunk_records": CHUNK_RECORDS, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (args.out / f"bench_mining{suffix}.json").write_text(json.dumps({"rows": rows, "env": env}, indent=1) + "\n")
    with open(args.out / f"bench_mining{suffix}.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[k for k in rows[0] if k != "mean_prompt_tokens"])
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if k != "mean_prompt_tokens"} for r in rows)
    plot(rows, args.out / f"bench_mining{suffix}.png")
    print(f"results in {args.out}/bench_mining{suffix}.{{json,csv,png}}")
    return rows


if __name__ == "__main__":
    main()
