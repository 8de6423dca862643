"""Attribution benchmark: fastrit against the knowledge-neurons-style loop and Captum, in one run.

Scenarios (one Llama-shaped model, random weights, fixed seed; ``--quick`` shrinks everything):

- ``last``: a 512-token prompt, 1-token answer, m = 20 riemann_right, positions "last",
  objective "prob", all layers. Providers: fastrit, the knowledge-neurons-style loop, and one
  plain no-grad forward of the same prompt.
- ``all``: the same at T = 256 with positions "all". Providers: fastrit and Captum's
  IntegratedGradients on the site, one layer at a time (with and without its convergence delta).
- ``delta``: |delta| of gausslegendre with 8 steps against riemann_right with 20 steps, positions
  "all", over the benchmark prompts.

Times are wall-clock medians (with 20th/80th percentiles) of ``--repeats`` runs, FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``. Results go to ``benchmarks/results/`` as JSON, CSV and
a PNG plot. Run: ``python -m benchmarks.bench_attribution`` (``make bench``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import fastrit
from benchmarks.baselines import KN_STEPS_PER_BATCH, captum_site_ig
from fastrit.attribution.inputs import scored_examples

RESULTS = Path(__file__).parent / "results"

FULL = dict(hidden=256, intermediate=704, layers=8, heads=4, vocab=2000, t_last=512, t_all=256, steps=20, prompts=3)
QUICK = dict(hidden=32, intermediate=48, layers=2, heads=4, vocab=96, t_last=24, t_all=12, steps=4, prompts=2)


@dataclass
class Row:
    scenario: str
    provider: str
    median_s: float
    p20_s: float
    p80_s: float
    runs: int
    gflops: float


def build_model(shape: dict) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["heads"],
        max_position_embeddings=max(1024, shape["t_last"] + 8), bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def prompts(shape: dict, length: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, shape["vocab"], (count, length), generator=gen)
    target_ids = torch.randint(3, shape["vocab"], (count, 1), generator=gen)
    return input_ids, target_ids


def measure(scenario: str, provider: str, fn: Callable[[], object], repeats: int) -> Row:
    """Median wall clock of ``repeats`` runs (after none: the first run is counted) and FLOPs of one run."""
    with FlopCounterMode(display=False) as counter:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    row = Row(scenario, provider, statistics.median(times), quantiles[0], quantiles[3], len(times),
              counter.get_total_flops() / 1e9)
    print(f"  {scenario:6s} {provider:32s} {row.median_s:9.3f} s   {row.gflops:10.2f} GFLOP", flush=True)
    return row


def captum_all_layers(model, input_ids, target_ids, steps: int, with_delta: bool) -> None:
    arch = fastrit.resolve_arch(model)
    (example,) = scored_examples(input_ids, None, target_ids, "all", arch.max_positions)
    for layer in range(arch.num_layers):
        captum_site_ig(model, arch, example, layer, "prob", "riemann_right", steps, with_delta=with_delta)


def run(shape: dict, repeats: int) -> dict:
    model = build_model(shape)
    steps = shape["steps"]
    rows: list[Row] = []

    print(f"last: T={shape['t_last']}, 1-token answer, m={steps} riemann_right, positions=last, objective=prob")
    ids, tgt = prompts(shape, shape["t_last"], 1, seed=1)
    last = dict(target_ids=tgt, positions="last", objective="prob", steps=steps, method="riemann_right")
    with torch.no_grad():
        rows.append(measure("last", "forward (no grad)", lambda: model(ids, use_cache=False), repeats))
    rows.append(measure("last", "fastrit", lambda: fastrit.attribute(model, ids, **last), repeats))
    rows.append(measure(
        "last", f"knowledge-neurons loop ({KN_STEPS_PER_BATCH}/batch)",
        lambda: fastrit.attribute_reference(model, ids, steps_per_batch=KN_STEPS_PER_BATCH, **last), repeats,
    ))

    print(f"all: T={shape['t_all']}, 1-token answer, m={steps} riemann_right, positions=all, objective=prob")
    ids_all, tgt_all = prompts(shape, shape["t_all"], 1, seed=2)
    every = dict(target_ids=tgt_all, positions="all", objective="prob", steps=steps, method="riemann_right")
    rows.append(measure("all", "fastrit", lambda: fastrit.attribute(model, ids_all, **every), repeats))
    rows.append(measure("all", "captum (with delta)",
                        lambda: captum_all_layers(model, ids_all, tgt_all, steps, True), repeats))
    rows.append(measure("all", "captum (no delta)",
                        lambda: captum_all_layers(model, ids_all, tgt_all, steps, False), repeats))

    print(f"delta: {shape['prompts']} prompts, T={shape['t_all']}, positions=all, objective=prob")
    ids_d, tgt_d = prompts(shape, shape["t_all"], shape["prompts"], seed=3)
    deltas = {}
    for method, method_steps in (("gausslegendre", 8), ("riemann_right", steps)):
        result = fastrit.attribute(model, ids_d, target_ids=tgt_d, positions="all", objective="prob",
                                   steps=method_steps, method=method)
        deltas[f"{method}_{method_steps}"] = {
            "max_abs_delta": float(result.delta.abs().max()),
            "mean_abs_delta": float(result.delta.abs().mean()),
        }

    def time_of(scenario: str, provider: str) -> Row:
        return next(r for r in rows if r.scenario == scenario and r.provider.startswith(provider))

    fast_last, kn, fwd = time_of("last", "fastrit"), time_of("last", "knowledge"), time_of("last", "forward")
    fast_all, cap, cap_nd = time_of("all", "fastrit"), time_of("all", "captum (with"), time_of("all", "captum (no")
    summary = {
        "last_speedup_vs_kn_loop": kn.median_s / fast_last.median_s,
        "last_time_over_forward": fast_last.median_s / fwd.median_s,
        "last_flop_ratio_kn_over_fastrit": kn.gflops / fast_last.gflops,
        "last_flop_ratio_fastrit_over_forward": fast_last.gflops / fwd.gflops,
        "all_speedup_vs_captum_with_delta": cap.median_s / fast_all.median_s,
        "all_speedup_vs_captum_no_delta": cap_nd.median_s / fast_all.median_s,
        "all_flop_ratio_captum_over_fastrit": cap.gflops / fast_all.gflops,
        "deltas": deltas,
    }
    return {"shape": shape, "repeats": repeats, "rows": [asdict(r) for r in rows], "summary": summary}


def environment() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastrit": fastrit.__version__,
        "device": "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write(report: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    with open(out_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, scenario in zip(axes, ("last", "all"), strict=True):
        rows = [r for r in report["rows"] if r["scenario"] == scenario]
        ax.bar([r["provider"] for r in rows], [r["median_s"] for r in rows],
               yerr=[[r["median_s"] - r["p20_s"] for r in rows], [r["p80_s"] - r["median_s"] for r in rows]])
        if scenario == "last":  # two orders of magnitude apart
            ax.set_yscale("log")
        ax.set_ylabel("seconds (median)" + (", log scale" if scenario == "last" else ""))
        ax.set_title(f"positions={scenario}")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"fastrit attribution, {report['env']['machine']} CPU x{report['env']['torch_threads']} threads")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)


def print_summary(report: dict) -> None:
    s = report["summary"]
    print("\nsummary")
    print(f"  last: fastrit {s['last_speedup_vs_kn_loop']:.1f}x faster than the knowledge-neurons loop "
          f"(FLOP ratio {s['last_flop_ratio_kn_over_fastrit']:.1f}x); {s['last_time_over_forward']:.2f}x "
          f"one no-grad forward (FLOPs {s['last_flop_ratio_fastrit_over_forward']:.2f}x)")
    print(f"  all:  fastrit {s['all_speedup_vs_captum_with_delta']:.2f}x faster than Captum with delta, "
          f"{s['all_speedup_vs_captum_no_delta']:.2f}x without "
          f"(FLOP ratio {s['all_flop_ratio_captum_over_fastrit']:.2f}x)")
    for name, value in s["deltas"].items():
        print(f"  delta {name:18s} max |delta| {value['max_abs_delta']:.3e}  "
              f"mean |delta| {value['mean_abs_delta']:.3e}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per provider (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: expected >= 1")
    shape = QUICK if args.quick else FULL
    report = run(shape, args.repeats)
    report["env"] = environment()
    name = "bench_attribution_quick" if args.quick else "bench_attribution"
    write(report, args.out, name)
    print_summary(report)
    print(f"\nwrote {args.out / name}.json, .csv, .png")
    return report


if __name__ == "__main__":
    main()
