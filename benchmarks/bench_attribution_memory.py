"""Peak memory of ``fastrit.attribute`` on 8B-shaped truncated Llama models on this CPU, beside plan_attribution.

The models: ``LlamaForCausalLM`` with Llama-3-8B's widths (fastrit.memory.BUILT_IN_CONFIGS["llama-3-8b"]: hidden
4096, MLP 14,336, 32 heads / 8 key-value heads of 128, vocabulary 128,256, untied head) and only 2 or 4 decoder
layers, SDPA attention, in bfloat16 or float32. They are built on the meta device, cast there, materialised with
``to_empty`` and filled from a pool of 2^24 normal values (std 0.02, seed 0), copied cyclically from an offset per
tensor, so that a 1-billion-value embedding costs a memory copy instead of a random draw; norms are 1 and the
rotary embedding is rebuilt. The numbers are meaningless; the shapes, dtypes and pages touched are the real ones.

The call: ``fastrit.attribute(model, input_ids, target_ids=..., steps=20, positions="last")`` with a random
``T``-token prompt and a random ``K``-token answer (seed 1), every layer, the default batch size, 2 threads.

Memory: each configuration runs in its own process (``--worker``, :mod:`benchmarks._process`): after the model is
built, glibc's ``malloc_trim`` and a reset of the peak (``/proc/self/clear_refs``); then ``VmHWM`` after the call is
the measured peak RSS, absolute: Python, torch and transformers, the weights and the attribution together. The plan
is ``fastrit.plan_attribution(config with that many layers, tokens=T, answer_tokens=K, steps=20, positions="last",
dtype=..., device="cpu")``, whose CPU peak includes the process baseline
(fastrit.attribution.plan.CPU_BASELINE_BYTES); ``ratio`` = plan / measured. The RSS after the imports and after
building is recorded too, ``attribution_over_built_gib`` (the peak minus the RSS before the call) beside the plan
minus its baseline and weights (``plan_over_weights_gib``), and ``baseline_after_gib``: the RSS after the call and
glibc's ``malloc_trim``, minus the weights (the process's own share, beside the plan's ``plan_baseline_gib``).

``--quick`` runs the same code on a small Llama-shaped config in seconds (the test). Results:
``benchmarks/results/bench_attribution_memory.{json,csv,png}``. Run: ``python -m benchmarks.bench_attribution_memory``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from benchmarks._process import print_row, release_freed_memory, reset_peak, run_worker, status_mib

RESULTS = Path(__file__).parent / "results"
RESULT_MARK = "BENCH_ATTR_MEMORY_RESULT "
THREADS = 2
STD = 0.02
POOL = 1 << 24
STEPS = 20
GIB = 1024**3
TOLERANCE = 0.15  # the plan within 15 % of the measured peak

#: (layers, prompt tokens, answer tokens, dtype)
FULL = [(2, 512, 1, "bfloat16"), (2, 2048, 1, "float32"), (4, 512, 1, "float32"), (4, 2048, 1, "bfloat16"),
        (2, 512, 5, "bfloat16")]
QUICK = [(2, 64, 1, "float32"), (2, 64, 3, "bfloat16")]
QUICK_WIDTHS = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256}


def llama_config(layers: int, quick: bool):
    """Llama-3-8B's config truncated to ``layers`` decoder layers (``quick``: small widths), SDPA attention."""
    import transformers

    from fastrit.memory import BUILT_IN_CONFIGS

    config = BUILT_IN_CONFIGS["llama-3-8b"]()
    if quick:
        config = transformers.LlamaConfig(**{**config.to_dict(), **QUICK_WIDTHS})
    config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    return config


# ---------------------------------------------------------------------------------------------- in the worker

def build_model(config, dtype_name: str):
    """The model of the module docstring. Returns ``(model, seconds)``."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    start = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=generator).mul_(STD).to(dtype)
    offset = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            flat, done = param.view(-1), 0
            while done < flat.numel():  # the pool from ``offset``, cyclically
                take = min(flat.numel() - done, POOL - offset)
                flat[done:done + take].copy_(pool[offset:offset + take])
                done, offset = done + take, (offset + take) % POOL
            offset = (offset + 7919) % POOL
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    del pool
    return model.eval(), time.perf_counter() - start


def worker(settings: dict) -> dict:
    import torch

    import fastrit
    from fastrit.attribution.plan import plan_attribution

    torch.set_num_threads(THREADS)
    rss_imports = status_mib("VmRSS") / 1024
    layers, tokens, answer, dtype = settings["layers"], settings["tokens"], settings["answer_tokens"], settings["dtype"]
    config = llama_config(layers, settings["quick"])
    model, build_s = build_model(config, dtype)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator)
    target_ids = torch.randint(0, config.vocab_size, (1, answer), generator=generator)
    release_freed_memory()
    rss_built = status_mib("VmRSS") / 1024
    reset_peak()
    start = time.perf_counter()
    result = fastrit.attribute(model, input_ids, target_ids=target_ids, steps=STEPS, positions="last")
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM") / 1024
    release_freed_memory()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / GIB
    baseline = status_mib("VmRSS") / 1024 - weights  # the process besides the weights, after the call, trimmed
    plan = plan_attribution(config, tokens=tokens, answer_tokens=answer, steps=STEPS, positions="last",
                            dtype=dtype, device="cpu")
    parts = plan.breakdown
    return {
        "layers": layers, "tokens": tokens, "answer_tokens": answer, "dtype": dtype,
        "plan_gib": plan.peak_gib, "measured_gib": peak, "ratio": plan.peak_gib / peak,
        "rss_after_imports_gib": rss_imports, "rss_built_gib": rss_built, "baseline_after_gib": baseline,
        "plan_baseline_gib": parts["process baseline"] / GIB,
        "attribution_over_built_gib": peak - rss_built,
        "plan_over_weights_gib": (plan.peak_bytes - parts["process baseline"] - parts["weights"]) / GIB,
        "chunk_rows": plan.settings["chunk_rows"], "build_s": build_s, "attribute_s": seconds,
        "delta_finite": bool(torch.isfinite(result.delta).all()), "scores_shape": list(result.scores.shape),
        "plan_breakdown_gib": {key: value / GIB for key, value in parts.items()},
    }


# ---------------------------------------------------------------------------------------------- in the parent

def print_table(rows: list[dict]) -> None:
    header = (f"{'layers':>6s} {'T':>5s} {'K':>2s} {'dtype':9s} {'rows':>5s} {'plan GiB':>8s} {'measured GiB':>12s} "
              f"{'plan/meas.':>10s} {'over built':>10s} {'plan over w.':>12s} {'baseline':>8s} {'attribute s':>11s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layers']:6d} {r['tokens']:5d} {r['answer_tokens']:2d} {r['dtype']:9s} {r['chunk_rows']:5d} "
              f"{r['plan_gib']:8.3f} {r['measured_gib']:12.3f} {r['ratio']:10.3f} "
              f"{r['attribution_over_built_gib']:10.3f} {r['plan_over_weights_gib']:12.3f} "
              f"{r['baseline_after_gib']:8.3f} {r['attribute_s']:11.1f}",
              flush=True)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per configuration: the plan's parts stacked (persistent, then the largest transient) beside the measured
    peak RSS."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastrit.attribution.plan import PERSISTENT_PARTS

    figure = Figure(figsize=(10, 5))
    axes = figure.add_subplot(1, 1, 1)
    colours = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452", "#937860"]
    labelled = set()
    for i, row in enumerate(rows):
        parts = row["plan_breakdown_gib"]
        chunk = parts["chunk: saved activations"] + parts["chunk: logits and workspace"]
        transient = max(("clean pass", "float32 projection"), key=lambda k: parts[k])
        shown = [*PERSISTENT_PARTS, *(("chunk: saved activations", "chunk: logits and workspace")
                                      if chunk >= parts[transient] else (transient,))]
        bottom = 0.0
        for part in shown:
            colour = colours[list(parts).index(part) % len(colours)]
            axes.bar(2 * i, parts[part], bottom=bottom, color=colour, width=0.8,
                     label=None if part in labelled else part)
            labelled.add(part)
            bottom += parts[part]
        axes.text(2 * i, bottom, f"plan\n{row['plan_gib']:.2f}", ha="center", va="bottom", fontsize=7)
        bar = axes.bar(2 * i + 0.9, row["measured_gib"], color="#333333", width=0.8,
                       label="measured peak RSS" if i == 0 else None)
        axes.bar_label(bar, [f"{row['measured_gib']:.2f}\n({row['ratio']:.2f})"], fontsize=7)
    axes.set_xticks([2 * i + 0.45 for i in range(len(rows))],
                    [f"{r['layers']} layers, T={r['tokens']}\nK={r['answer_tokens']}, {r['dtype']}" for r in rows],
                    fontsize=7)
    axes.set_ylabel("GiB", fontsize=9)
    axes.legend(fontsize=6, loc="upper left")
    axes.grid(axis="y", alpha=0.3)
    axes.margins(y=0.15)
    figure.suptitle(title, fontsize=9)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def write(rows: list[dict], env: dict, out: Path, name: str, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "steps": STEPS, "positions": "last",
                                                  "tolerance": TOLERANCE, "env": env}, indent=1) + "\n")
    flat = [{k: v for k, v in r.items() if k not in ("plan_breakdown_gib", "scores_shape")} for r in rows]
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    plot(rows, out / f"{name}.png", title)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small Llama-shaped config, seconds (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        row = worker(json.loads(args.worker_settings))
        print_row(RESULT_MARK, row)
        return [row]
    configs = QUICK if args.quick else FULL
    print(f"Llama-3-8B widths{' (quick: small widths)' if args.quick else ''}, steps {STEPS}, positions 'last', "
          f"{THREADS} threads; each configuration in its own process", flush=True)
    start = time.perf_counter()
    rows = []
    for layers, tokens, answer, dtype in configs:
        settings = {"layers": layers, "tokens": tokens, "answer_tokens": answer, "dtype": dtype, "quick": args.quick}
        rows.append(run_worker("benchmarks.bench_attribution_memory", "attribute", settings, RESULT_MARK))
        print(f"  {layers} layers, T={tokens}, K={answer}, {dtype}: done ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print_table(rows)
    env = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "threads": THREADS, "python": platform.python_version(),
           **{name: metadata.version(name) for name in ("torch", "transformers", "fastrit")},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - start}
    name = "bench_attribution_memory_quick" if args.quick else "bench_attribution_memory"
    title = (f"fastrit.attribute, Llama-3-8B widths truncated, steps {STEPS}, positions 'last': "
             "plan_attribution(device='cpu') vs measured peak RSS (plan/measured)")
    write(rows, env, args.out, name, title)
    print(f"results in {args.out}/{name}.{{json,csv,png}} ({env['wall_s']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
