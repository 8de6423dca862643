"""Attribution benchmark: fastrit against the knowledge-neurons-style loop, Captum and the knowledge-neurons
package, in one run.

Scenarios (one Llama-shaped model, random weights, fixed seed; ``--quick`` shrinks everything):

- ``last``: a 512-token prompt, 1-token answer, m = 20 riemann_right, positions "last",
  objective "prob", all layers. Providers: fastrit, the knowledge-neurons-style loop, and one
  plain no-grad forward of the same prompt.
- ``all``: the same at T = 256 with positions "all". Providers: fastrit and Captum's
  IntegratedGradients on the site, one layer at a time (with and without its convergence delta).
- ``delta``: |delta| of gausslegendre with 8 steps against riemann_right with 20 steps, positions
  "all", over the benchmark prompts.
- ``kn_gpt2``: ``KnowledgeNeurons.get_scores`` of the knowledge-neurons package (0.0.2) against
  ``fastrit.compat.KnowledgeNeurons`` on a GPT-2-shaped model (6 layers, hidden 256, GPT-2's vocabulary), a
  256-token prompt, steps 20, batch_size 20; ``kn_bert``: the same on a 4-layer BERT (hidden 256, BERT's
  vocabulary) with a 128-token input. The largest score difference (relative to the largest score) is reported.
- ``--real-shapes``: SmolLM2-135M's shape (real weights when available) with 1- and 5-token answers and
  Llama-3-8B's layer shape, truncated, against the reference loop (:mod:`benchmarks.attribution_real_shapes`);
  ``--only-real-shapes`` runs just those, ``--device cuda`` on a GPU (bf16).

Times are wall-clock medians (with 20th/80th percentiles) of ``--repeats`` runs, FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``. Results go to ``benchmarks/results/`` as JSON, CSV and
a PNG plot. Run: ``python -m benchmarks.bench_attribution`` (``make bench``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
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
from benchmarks.attribution_real_shapes import run_real_shapes
from benchmarks.baselines import KN_STEPS_PER_BATCH, captum_site_ig
from fastrit.attribution.inputs import scored_examples

RESULTS = Path(__file__).parent / "results"

FULL = dict(hidden=256, intermediate=704, layers=8, heads=4, vocab=2000, t_last=512, t_all=256, steps=20, prompts=3)
QUICK = dict(hidden=32, intermediate=48, layers=2, heads=4, vocab=96, t_last=24, t_all=12, steps=4, prompts=2)
# the knowledge-neurons scenarios: (layers, hidden, heads, vocabulary, prompt tokens, steps, batch_size)
KN_FULL = {"gpt2": (6, 256, 4, 50257, 256, 20, 20), "bert": (4, 256, 4, 30522, 128, 20, 20)}
KN_QUICK = {"gpt2": (2, 32, 4, 200, 16, 4, 2), "bert": (2, 32, 4, 200, 12, 4, 2)}


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


def kn_setup(kind: str, shape: tuple, folder: Path):
    """A ``kind`` ("gpt2" or "bert") model with random weights, a word-level tokenizer over ``w0 w1 ...`` and a
    prompt of the scenario's length (BERT's with its [CLS], [MASK] in the middle and [SEP])."""
    from fastrit.demo.pretrain import word_tokenizer

    layers, hidden, heads, vocab, tokens, _, _ = shape
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    if kind == "gpt2":
        tokenizer = word_tokenizer([f"w{i}" for i in range(vocab - 4)])
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=hidden, n_layer=layers,
                                         n_head=heads)
        words = [f"w{i}" for i in torch.randint(0, vocab - 4, (tokens,), generator=gen).tolist()]
        return transformers.GPT2LMHeadModel(config).eval(), tokenizer, " ".join(words)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join([*specials, *(f"w{i}" for i in range(vocab - 5))]) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden)
    words = [f"w{i}" for i in torch.randint(0, vocab - 5, (tokens - 2,), generator=gen).tolist()]
    words[len(words) // 2] = "[MASK]"
    return transformers.BertForMaskedLM(config).eval(), tokenizer, " ".join(words)


def kn_scenario(kind: str, shape: tuple, repeats: int, rows: list) -> float:
    """Time ``get_scores`` of the package and of fastrit's drop-in; returns max |difference| / max |score|."""
    import tempfile

    from knowledge_neurons import KnowledgeNeurons as PackageKN

    from fastrit.compat import KnowledgeNeurons

    _, _, _, _, tokens, steps, batch_size = shape
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, prompt = kn_setup(kind, shape, Path(folder))
    print(f"kn_{kind}: {shape[0]} layers, hidden {shape[1]}, vocabulary {len(tokenizer)}, {tokens}-token prompt, "
          f"steps={steps}, batch_size={batch_size}")
    target = tokenizer.convert_ids_to_tokens(7)
    package = PackageKN(model, tokenizer, model_type=kind, device="cpu")
    ours = KnowledgeNeurons(model, tokenizer, model_type=kind, device="cpu")
    settings = dict(batch_size=batch_size, steps=steps, pbar=False)
    assert package._prepare_inputs(prompt)[0]["input_ids"].shape[1] == tokens
    scenario = f"kn_{kind}"
    rows.append(measure(scenario, "fastrit.compat", lambda: ours.get_scores(prompt, target, **settings), repeats))
    rows.append(measure(scenario, "knowledge-neurons 0.0.2",
                        lambda: package.get_scores(prompt, target, **settings), repeats))
    ref = package.get_scores(prompt, target, **settings).detach()
    got = ours.get_scores(prompt, target, **settings)
    return float((got - ref).abs().max() / ref.abs().max())


def run(shape: dict, repeats: int, kn_shapes: dict) -> dict:
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

    kn_error = {kind: kn_scenario(kind, kn_shape, repeats, rows) for kind, kn_shape in kn_shapes.items()}

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
    for kind, error in kn_error.items():
        package, ours = time_of(f"kn_{kind}", "knowledge-neurons"), time_of(f"kn_{kind}", "fastrit")
        summary[f"kn_{kind}_speedup"] = package.median_s / ours.median_s
        summary[f"kn_{kind}_flop_ratio"] = package.gflops / ours.gflops
        summary[f"kn_{kind}_max_rel_difference"] = error
    kn = {kind: dict(zip(("layers", "hidden", "heads", "vocab", "tokens", "steps", "batch_size"), v, strict=True))
          for kind, v in kn_shapes.items()}
    return {"shape": shape, "kn_shapes": kn, "repeats": repeats, "rows": [asdict(r) for r in rows],
            "summary": summary}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # a GPU machine without the reference packages
        return None


def environment() -> dict:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "knowledge_neurons": _version("knowledge-neurons"),
        "fastrit": fastrit.__version__,
        "device": "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def write(report: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    tables = {name: report["rows"]}
    if report.get("real_shapes"):
        tables[name if not report["rows"] else f"{name}_real_shapes"] = report["real_shapes"]
    for table, rows in tables.items():
        if rows:
            _write_csv(out_dir / f"{table}.csv", rows)
    if not report["rows"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = ("last", "all", "kn_gpt2", "kn_bert")
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4))
    for ax, scenario in zip(axes, scenarios, strict=True):
        rows = [r for r in report["rows"] if r["scenario"] == scenario]
        ax.bar([r["provider"] for r in rows], [r["median_s"] for r in rows],
               yerr=[[r["median_s"] - r["p20_s"] for r in rows], [r["p80_s"] - r["median_s"] for r in rows]])
        log = scenario != "all"  # one to two orders of magnitude apart
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("seconds (median)" + (", log scale" if log else ""))
        ax.set_title(f"positions={scenario}" if scenario in ("last", "all") else f"get_scores, {scenario}")
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
    for kind in ("gpt2", "bert"):
        print(f"  kn_{kind}: fastrit.compat {s[f'kn_{kind}_speedup']:.1f}x faster than knowledge-neurons 0.0.2 "
              f"(FLOP ratio {s[f'kn_{kind}_flop_ratio']:.1f}x); max |difference| / max |score| "
              f"{s[f'kn_{kind}_max_rel_difference']:.1e}")
    for name, value in s["deltas"].items():
        print(f"  delta {name:18s} max |delta| {value['max_abs_delta']:.3e}  "
              f"mean |delta| {value['mean_abs_delta']:.3e}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per provider (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--real-shapes", action="store_true",
                        help="also SmolLM2-135M's and Llama-3-8B's shapes against the reference loop")
    parser.add_argument("--only-real-shapes", action="store_true", help="only the real shapes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the real shapes run (the other scenarios run on the CPU)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: expected >= 1")
    shape = QUICK if args.quick else FULL
    name = "bench_attribution_quick" if args.quick else "bench_attribution"
    if args.only_real_shapes:
        report = {"shape": None, "repeats": args.repeats, "rows": [], "summary": {}}
        name += "_real_shapes"
    else:
        report = run(shape, args.repeats, KN_QUICK if args.quick else KN_FULL)
    if args.real_shapes or args.only_real_shapes:
        report["real_shapes"] = run_real_shapes(args.repeats, args.quick, args.device)
    report["env"] = {**environment(), "device": args.device}
    write(report, args.out, name)
    if report["rows"]:
        print_summary(report)
    print(f"\nwrote {args.out / name}.json, .csv" + (", .png" if report["rows"] else ""))
    return report


if __name__ == "__main__":
    main()
