"""One real training step of a Llama-3-8B-shaped model on this CPU, in the paper's setting, beside fastrit.plan_memory.

The model: ``LlamaForCausalLM`` with Llama-3-8B's shape (fastrit.tuning.plan.BUILT_IN_CONFIGS["llama-3-8b"]: 32
layers, hidden 4096, MLP 14,336, 32 heads / 8 key-value heads, vocabulary 128,256, untied head), random weights
(normal, std 0.02, seeded), SDPA attention, in ``--dtype``. It is built on the meta device and materialised one
projection at a time: every projection that stays frozen is drawn and quantized to NF4 at once
(``fastrit.nn.NF4Linear.from_weight``), so the full-precision decoder (14 GiB in bf16, 28 in fp32) never exists;
the target layers' MLP projections, the embeddings, the output head and the norms are drawn dense.

``--dtype`` is float32 by default on this CPU: it has no native bfloat16 arithmetic (no AVX512-BF16/AMX), and
PyTorch's bfloat16 matrix products run here at about 10 GFLOP/s per thread with the second operand transposed and
0.3 GFLOP/s without it (every ``grad @ W`` of a backward pass), against about 50 in float32: a bf16 step would take
hours. Memory is measured and planned in the same dtype, so the comparison with the plan holds either way;
``--dtype bfloat16`` runs the GPU setting on a CPU that has bf16 arithmetic.

The step, as ``fastrit.tune`` takes it: ``fastrit.prepare(model, deactivate=None, train_layers=targets, train=MODE,
quantize_frozen="nf4", planned_batch=(1, 256))`` (NF4: what ``"auto"`` takes for this model, whose float32 weights
alone exceed this machine's memory; the NF4 layers already there are kept, the target layers' frozen neurons
quantized) with the default ``gradient_checkpointing="auto"`` (on when the step without it would not fit 0.9 x
this machine's available memory plus the model: recorded as ``gradient_checkpointing`` and ``settings_reason``),
bitsandbytes 8-bit
AdamW (lr 1e-4) over the trainable parameters, the loss of ``fastrit.tuning.causal_lm_loss`` on random token ids
(batch 1 x 256, every position labelled); forward (with the loss), backward and the optimizer step, each timed.
Modes: ``mlp`` (the paper's: the target layers' full MLPs, 528,482,304 parameters) and ``neurons`` (1,433 neurons
per target layer: their gate/up rows and down columns). Target layers 14, 15, 16 (``--targets``): the backward pass
runs through the 18 layers from 14 up.

Memory: each mode runs in its own process (``--worker``); after building and preparing, glibc's ``malloc_trim`` and a
reset of the peak (``/proc/self/clear_refs``), then ``VmHWM`` after the step: ``peak_rss_gib`` (absolute) and
``peak_over_start_gib`` (minus the RSS right after the imports, the Python + torch + transformers baseline). The
prediction is ``fastrit.plan_memory("llama-3-8b", seq_len=256, batch_size=1, train=MODE, train_layers=targets,
neurons=1433 for neurons, quantize_frozen="nf4", optimizer="adamw8bit", gradient_checkpointing=as chosen,
dtype=the same, device="cpu")``, beside the peak over the start (``plan_vs_measured``).

That the step is real: its loss; every trainable tensor's share of changed values (on 65,536 values drawn at random,
with replacement, and copied before the step) and how many tensors changed; a digest of every NF4 byte and of every
other frozen tensor before and after (they must not change).

One step takes a few minutes here; ``--quick`` runs the same code on a small Llama-shaped config in seconds (the
test). Results:
``benchmarks/results/bench_8b_cpu.{json,png}``. Run: ``python -m benchmarks.bench_8b_cpu``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

from benchmarks._process import print_row, release_freed_memory, reset_peak, run_worker, status_mib

RESULTS = Path(__file__).parent / "results"
RESULT_MARK = "BENCH_8B_RESULT "
LR = 1e-4
THREADS = 2
STD = 0.02
SAMPLE = 65536
GIB = 1024**3

FULL = {"config": "llama-3-8b", "seq": 256, "batch": 1, "targets": [14, 15, 16], "neurons": 1433,
        "dtype": "float32"}
QUICK = {"config": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                    "tie_word_embeddings": False},
         "seq": 32, "batch": 1, "targets": [1, 2], "neurons": 16, "dtype": "float32"}
MODES = ("mlp", "neurons")


def _config(settings: dict):
    import transformers

    from fastrit.tuning.plan import BUILT_IN_CONFIGS

    spec = settings["config"]
    config = BUILT_IN_CONFIGS[spec]() if isinstance(spec, str) else transformers.LlamaConfig(**spec)
    config._attn_implementation = "sdpa"
    return config


# ---------------------------------------------------------------------------------------------- in the worker

def build_model(settings: dict):
    """The model of the module docstring: frozen projections straight to NF4, one at a time; the rest dense.
    Returns ``(model, seconds)``."""
    import torch
    from torch import nn
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    from fastrit.nn import NF4Linear

    start = time.perf_counter()
    dtype = getattr(torch, settings["dtype"])
    config = _config(settings)
    config.dtype = dtype
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).mul_(STD)

    def dense(in_features: int, out_features: int) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(draw(out_features, in_features))
        return layer

    def norm() -> LlamaRMSNorm:
        return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    targets = set(settings["targets"])
    for index, layer in enumerate(model.model.layers):
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                meta = getattr(block, name)
                if block is layer.mlp and index in targets:
                    setattr(block, name, dense(meta.in_features, meta.out_features))
                else:  # drawn and quantized at once: one projection in full precision at a time
                    setattr(block, name, NF4Linear.from_weight(draw(meta.out_features, meta.in_features)))
        layer.input_layernorm, layer.post_attention_layernorm = norm(), norm()
    embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
    with torch.no_grad():
        embeddings.weight.copy_(draw(config.vocab_size, config.hidden_size))
    model.model.embed_tokens = embeddings
    model.lm_head = dense(config.hidden_size, config.vocab_size)
    model.model.norm = norm()
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise RuntimeError(f"not materialised: {left[:5]}")
    model.train()
    return model, time.perf_counter() - start


def _frozen_checksums(model) -> dict[str, str]:
    """Per frozen tensor (NF4 bytes and dense alike), a BLAKE2 digest of its bytes (read in place, no copy)."""
    import torch

    sums = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or getattr(tensor, "requires_grad", False):
            continue
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        sums[name] = hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()
    return sums


def worker(mode: str, settings: dict) -> dict:
    import bitsandbytes as bnb
    import torch

    import fastrit
    from fastrit.tuning import causal_lm_loss, plan_memory

    torch.set_num_threads(THREADS)
    rss_imports = status_mib("VmRSS") / 1024
    seconds = {}
    model, seconds["build"] = build_model(settings)
    start = time.perf_counter()
    kwargs = {}
    if mode == "neurons":
        kwargs["neurons"] = {layer: list(range(settings["neurons"])) for layer in settings["targets"]}
    # NF4: what "auto" takes for this model dense (its float32 weights alone are more than this machine's memory);
    # gradient_checkpointing: prepare's default, "auto"
    fastrit.prepare(model, deactivate=None, train_layers=list(settings["targets"]), train=mode,
                    quantize_frozen="nf4", planned_batch=(settings["batch"], settings["seq"]), **kwargs)
    seconds["prepare"] = time.perf_counter() - start
    chosen = model.fastrit_preparation.settings
    checkpointing = chosen["gradient_checkpointing"]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    trainable_params = sum(p.numel() for p in trainable.values())
    optimizer = bnb.optim.AdamW8bit(list(trainable.values()), lr=LR)
    generator = torch.Generator().manual_seed(1)
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (settings["batch"], settings["seq"]), generator=generator)
    samples = {}
    for name, p in trainable.items():
        # with replacement: a slice of randperm(numel) would keep its whole int64 storage alive (GiBs here)
        index = torch.randint(0, p.numel(), (SAMPLE,), generator=generator)
        samples[name] = (index, p.detach().view(-1)[index].clone())
    frozen_before = _frozen_checksums(model)

    release_freed_memory()
    rss_prepared = status_mib("VmRSS") / 1024
    peak_before = status_mib("VmHWM") / 1024
    reset_peak()
    start = time.perf_counter()
    loss = causal_lm_loss(model, input_ids, input_ids)
    seconds["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    seconds["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    seconds["optimizer"] = time.perf_counter() - start
    peak = status_mib("VmHWM") / 1024

    changed = {name: float((p.detach().view(-1)[index] != old).float().mean())
               for name, p in trainable.items() for index, old in [samples[name]]}
    frozen_after = _frozen_checksums(model)
    plan = plan_memory(_config(settings), seq_len=settings["seq"], batch_size=settings["batch"], train=mode,
                       train_layers=list(settings["targets"]),
                       neurons=settings["neurons"] if mode == "neurons" else None, quantize_frozen="nf4",
                       optimizer="adamw8bit", gradient_checkpointing=checkpointing, dtype=settings["dtype"],
                       device="cpu")
    return {
        "mode": mode, "loss": float(loss.detach()), "trainable_params": trainable_params,
        "gradient_checkpointing": checkpointing, "settings_reason": chosen["quantize_reason"],
        "plan_trainable_params": plan.trainable_params,
        "trainable_tensors": len(trainable), "tensors_changed": sum(share > 0 for share in changed.values()),
        "changed_share_min": min(changed.values()), "changed_share_mean": sum(changed.values()) / len(changed),
        "frozen_tensors": len(frozen_before), "frozen_unchanged": frozen_before == frozen_after,
        "seconds": seconds, "step_s": seconds["forward"] + seconds["backward"] + seconds["optimizer"],
        "rss_after_imports_gib": rss_imports, "rss_prepared_gib": rss_prepared,
        "peak_before_step_gib": peak_before, "peak_rss_gib": peak, "peak_over_start_gib": peak - rss_imports,
        "plan_gib": plan.peak_bytes / GIB, "plan_vs_measured": plan.peak_bytes / GIB / (peak - rss_imports),
        "plan_breakdown_gib": {key: value / GIB for key, value in plan.breakdown.items()},
    }


# ---------------------------------------------------------------------------------------------- in the parent

def run_mode(mode: str, settings: dict) -> dict:
    return run_worker("benchmarks.bench_8b_cpu", mode, settings, RESULT_MARK)


def print_table(rows: list[dict]) -> None:
    header = (f"{'train':8s} {'trainable':>13s} {'peak RSS GiB':>12s} {'over start':>10s} {'plan GiB':>8s} "
              f"{'plan/meas.':>10s} {'build s':>8s} {'forward s':>9s} {'backward s':>10s} {'optim. s':>8s} "
              f"{'loss':>8s} {'changed':>8s} {'frozen same':>11s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["seconds"]
        print(f"{r['mode']:8s} {r['trainable_params']:13,d} {r['peak_rss_gib']:12.2f} {r['peak_over_start_gib']:10.2f} "
              f"{r['plan_gib']:8.2f} {r['plan_vs_measured']:10.2f} {s['build']:8.1f} {s['forward']:9.1f} "
              f"{s['backward']:10.1f} {s['optimizer']:8.1f} {r['loss']:8.4f} "
              f"{r['tensors_changed']:>3d}/{r['trainable_tensors']:<4d} {str(r['frozen_unchanged']):>11s}",
              flush=True)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Per mode: the plan stacked (what persists, then the larger transient: the step's or the optimizer's, as
    plan_memory's peak counts them), beside the measured peak over the import baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fastrit.tuning.plan import PERSISTENT_PARTS, STEP_PARTS

    figure = Figure(figsize=(9, 5))
    axes = figure.add_subplot(1, 1, 1)
    colours = dict(zip((*PERSISTENT_PARTS, *STEP_PARTS, "optimizer workspace"),
                       ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#999999", "#dd8452"],
                       strict=True))
    labelled = set()
    for i, row in enumerate(rows):
        parts = row["plan_breakdown_gib"]
        step = sum(parts[k] for k in STEP_PARTS)
        shown = [*PERSISTENT_PARTS, *(STEP_PARTS if step >= parts["optimizer workspace"] else ("optimizer workspace",))]
        bottom = 0.0
        for part in shown:
            axes.bar(2 * i, parts[part], bottom=bottom, color=colours[part], width=0.8,
                     label=None if part in labelled else part)
            labelled.add(part)
            bottom += parts[part]
        axes.text(2 * i, bottom, f"plan\n{row['plan_gib']:.2f}", ha="center", va="bottom", fontsize=8)
        bar = axes.bar(2 * i + 0.9, row["peak_over_start_gib"], color="#333333", width=0.8,
                       label="measured peak over imports" if i == 0 else None)
        axes.bar_label(bar, [f"measured\n{row['peak_over_start_gib']:.2f}"], fontsize=8)
    axes.set_xticks([2 * i + 0.45 for i in range(len(rows))],
                    [f"train={r['mode']}\n{r['trainable_params']:,} trainable" for r in rows], fontsize=8)
    axes.set_ylabel("GiB (lower is better)", fontsize=9)
    axes.legend(fontsize=7, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    axes.margins(y=0.15)
    figure.suptitle(title, fontsize=9)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small Llama-shaped config, seconds (a smoke run)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--targets", default=None, help="target layers, comma-separated (default 14,15,16)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="the model's dtype (default float32: this CPU has no bf16 arithmetic; see the docstring)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        row = worker(args.worker, json.loads(args.worker_settings))
        print_row(RESULT_MARK, row)
        return [row]
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}")
    settings = dict(QUICK if args.quick else FULL)
    if args.targets is not None:
        try:
            settings["targets"] = sorted({int(t) for t in args.targets.split(",")})
        except ValueError:
            parser.error(f"--targets: expected comma-separated layer indices, got {args.targets!r}")
    if args.dtype is not None:
        settings["dtype"] = args.dtype
    config = _config(settings)
    if not all(0 <= t < config.num_hidden_layers for t in settings["targets"]):
        parser.error(f"--targets: expected layers in [0, {config.num_hidden_layers})")
    print(f"model: {settings['config'] if isinstance(settings['config'], str) else 'quick'} shape, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"vocab {config.vocab_size}, {settings['dtype']}; batch {settings['batch']} x {settings['seq']}; targets "
          f"{settings['targets']}; {THREADS} threads; each mode in its own process", flush=True)
    start = time.perf_counter()
    rows = []
    for mode in modes:
        rows.append(run_mode(mode, settings))
        print(f"  {mode}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(rows)
    env = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "threads": THREADS, "python": platform.python_version(),
           **{name: metadata.version(name) for name in ("torch", "transformers", "bitsandbytes", "fastrit")},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - start}
    name = "bench_8b_cpu_quick" if args.quick else "bench_8b_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"rows": rows, "settings": settings | {"lr": LR, "std": STD},
                                                       "env": env}, indent=1) + "\n")
    title = (f"one training step, Llama-3-8B shape, {settings['dtype']}, NF4 frozen, 8-bit AdamW, checkpointing, batch "
             f"{settings['batch']} x {settings['seq']}, targets {settings['targets']}: plan vs measured (CPU)")
    plot(rows, args.out / f"{name}.png", title)
    print(f"results in {args.out}/{name}.{{json,png}} ({env['wall_s']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
