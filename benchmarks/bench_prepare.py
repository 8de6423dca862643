"""Training memory and step time of a model prepared by ``fastrit.prepare`` against the plain way, on CPU.

The model: a Llama-shaped ``LlamaForCausalLM`` built from a config (8 layers, hidden 512, MLP 1408, 8 heads,
vocabulary 32,000, untied output head), fp32, random weights (``torch.manual_seed(0)``), attention through
``attn_implementation="sdpa"``. Inputs: random token ids (seed 0), batch 4 x 512 tokens, labels = the input ids
(the model's own causal LM loss, ``model(input_ids=..., labels=..., use_cache=False)``; ``use_cache=False`` for
every provider, so that no provider builds a key/value cache it never uses).

Neurons: a fixed random 3 % of the neurons of every layer are deactivated (seed 1); the target layers are 4, 5
and 6 (the paper trains three layers); ``train="neurons"`` trains a fixed random 10 % of each target layer's
neurons that are not deactivated (seed 2; at 8B the paper trains 1,433 of 14,336 = 10 %).

Providers, one training configuration each:

- ``plain mlp``: the fp32 model; forward pre-hooks on every layer's ``mlp.down_proj`` multiply its input by a 0/1
  mask (the deactivated neurons' columns zeroed); ``requires_grad`` only on the target layers' gate/up/down
  weights; ``torch.optim.AdamW``.
- ``plain neurons``: the same, plus gradient masking (``param.register_hook``): the gradient rows of gate/up and
  the gradient columns of down of the neurons not chosen are zeroed, so that only the chosen neurons change;
  AdamW over the three full weights of each target layer (what users do without fastrit).
- ``plain lora``: PEFT ``LoraConfig(r=8, lora_alpha=16, target_modules=gate/up/down_proj,
  layers_to_transform=targets)`` through ``peft.get_peft_model`` on the fp32 model; the zeroing hooks go on the
  modules at ``mlp.down_proj`` after wrapping, so that the LoRA path sees the zeroed site as well.
- ``fastrit mlp`` / ``fastrit neurons`` / ``fastrit lora``: fastrit's way of the same training:
  ``fastrit.prepare(model, deactivate=..., train_layers=targets, train=..., neurons=... (neurons only),
  quantize_frozen="nf4", gradient_checkpointing=True)`` and the loss of ``fastrit.tuning.causal_lm_loss`` (the
  output head a chunk of positions at a time, each chunk's gradient formed at once: the same loss values and
  gradients as the model's own loss), AdamW over the parameters that require grad.
- ``fastrit neurons (model's loss)``, ``(no checkpointing)``, ``(no NF4)``: one part of fastrit's way off at a
  time, to show where the savings come from; ``plain neurons (fastrit's loss)``: the plain way with fastrit's loss
  only, so that what ``prepare`` saves shows beside what the loss saves.
- ``floor: head + loss only``: no training; each step is final norm + output head + the model's loss from a
  ``[B, T, H]`` hidden state that requires grad, and its backward. Its ``peak_over_prepared_mib`` is the memory
  that the model's own loss needs at this shape whatever is trained (the fp32 logits ``[B, T, V]``, their
  log-softmax and, in backward, two gradients of that size: about 1 GiB here), and its time that part of a step.
  ``excl. head`` in the table compares the peaks over the start minus that transient, fastrit's against plain's.

The plain providers use no gradient checkpointing (the plain way); only the fastrit rows use it (its default).
Every provider: AdamW with lr 1e-4 and ``weight_decay=0`` (with AdamW's default decay the masked weights of
``plain neurons`` would still shrink, so only-the-chosen-neurons-change would not hold), ``torch.set_num_threads(2)``.

Measurement: each provider runs in its own subprocess (``python -m benchmarks.bench_prepare --worker NAME``), so
that the peak resident set size is that configuration's alone. After the model is built and prepared and the
optimizer made, the worker runs ``gc.collect()`` and glibc's ``malloc_trim(0)`` (the fp32 weights that
preparation freed must not count), then resets the peak with ``/proc/self/clear_refs`` (5) and reads ``VmHWM``
from ``/proc/self/status`` after the steps: ``peak_rss_mib`` is the absolute peak during training (warm-up step,
which allocates AdamW's state, included), ``peak_over_start_mib`` that minus the RSS right after the imports (the
Python + torch + transformers + fastrit baseline, the same for every provider). The RSS after preparation and the
peak while building/preparing are recorded too. glibc's malloc runs with its defaults (what users get).
The baseline after the imports is large (about 1 GiB here: torch's CUDA build, transformers, peft, bitsandbytes,
fastrit) and the same for every provider, so the absolute peak ratio cannot go far below 1 however little
training takes: ``peak_over_start_mib`` is the memory of the training itself. Ratios are against the ``plain`` row
of the same train mode (``fastrit neurons (...)`` against ``plain neurons``).

``--rounds N`` runs every provider N times, round by round (all providers once, then again), and reports the
medians: of each measurement, and of each round's ratio against its plain row, with the range of the per-round
step ratios (``step_vs_plain_rounds``); one run on a shared machine is too noisy (+-15 %) to call a 10 % difference.

Time: one warm-up step, then ``--steps`` timed steps (zero_grad / forward / backward / optimizer step,
``time.perf_counter``); the median seconds per step, with min and max, and the median CPU seconds of the process
per step (``time.process_time``; up to 2x the wall time on 2 threads); the 1-minute load average at the worker's
start and end is recorded, since other work on a shared machine slows a step. The loss of the first (warm-up) and
of the last step shows that training runs (same batch every step, so it goes down). Workers run one at a time
(``--jobs``; 2 at a time with ``--quick``, whose times are then contended: a smoke run).

``trainable_params`` counts what requires grad (what AdamW holds state for): for ``plain neurons`` that is the
three full weights of each target layer, while only ``changing_params`` of them can change. For fastrit rows it
is ``fastrit.trainable_summary(model)["total"]["trainable"]``.

``plan`` in the table: ``fastrit.plan_memory``'s prediction for the row's settings over its measured peak over
the import baseline (``plan_mib``, ``plan_vs_measured``). The planner counts live tensors; glibc's malloc keeps
freed blocks under its (dynamic, up to 32 MiB) mmap threshold for reuse, so with its defaults the RSS peak is
higher than the live tensors ever were. ``--malloc-mmap-threshold 65536`` runs the workers with freed blocks
returned to the system (results: ``bench_prepare_mmap.*``), where the RSS follows the live tensors.

Results: ``benchmarks/results/bench_prepare.{json,csv,png}`` (``_quick`` with ``--quick``). Run:
``python -m benchmarks.bench_prepare`` (``--providers "plain neurons,fastrit neurons"`` for a subset).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from benchmarks._process import print_row, release_freed_memory, reset_peak, run_worker, status_mib

RESULTS = Path(__file__).parent / "results"
RESULT_MARK = "BENCH_PREPARE_RESULT "
LR = 1e-4
THREADS = 2

FULL = {"layers": 8, "hidden": 512, "intermediate": 1408, "heads": 8, "vocab": 32000, "seq": 512, "batch": 4,
        "targets": [4, 5, 6], "deactivate_share": 0.03, "neuron_share": 0.10, "steps": 5}
QUICK = {"layers": 4, "hidden": 64, "intermediate": 176, "heads": 8, "vocab": 512, "seq": 32, "batch": 2,
         "targets": [1, 2], "deactivate_share": 0.03, "neuron_share": 0.10, "steps": 1}

#: provider -> (kind, train mode, options: fastrit.prepare keyword arguments, and "loss": "chunked" for causal_lm_loss)
PROVIDERS = {
    "plain mlp": ("plain", "mlp", {}),
    "plain neurons": ("plain", "neurons", {}),
    "plain lora": ("plain", "lora", {}),
    "fastrit mlp": ("fastrit", "mlp", {"loss": "chunked"}),
    "fastrit neurons": ("fastrit", "neurons", {"loss": "chunked"}),
    "fastrit lora": ("fastrit", "lora", {"loss": "chunked"}),
    "fastrit neurons (model's loss)": ("fastrit", "neurons", {}),
    "fastrit neurons (no checkpointing)": ("fastrit", "neurons", {"loss": "chunked", "gradient_checkpointing": False}),
    "fastrit neurons (no NF4)": ("fastrit", "neurons", {"loss": "chunked", "quantize_frozen": None}),
    "plain neurons (fastrit's loss)": ("plain", "neurons", {"loss": "chunked"}),
    "floor: head + loss only": ("floor", None, {}),
}


# ---------------------------------------------------------------------------------------------- in the worker

def neuron_choice(settings: dict) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """``(deactivated, chosen)``: ``{layer: sorted neuron indices}``, fixed random draws (seeds 1 and 2)."""
    import torch

    layers, intermediate = settings["layers"], settings["intermediate"]
    n_off = max(1, round(settings["deactivate_share"] * intermediate))
    generator = torch.Generator().manual_seed(1)
    deactivated = {layer: sorted(torch.randperm(intermediate, generator=generator)[:n_off].tolist())
                   for layer in range(layers)}
    generator = torch.Generator().manual_seed(2)
    chosen = {}
    for layer in settings["targets"]:
        kept = torch.tensor([i for i in range(intermediate) if i not in set(deactivated[layer])])
        n_on = max(1, round(settings["neuron_share"] * len(kept)))
        chosen[layer] = sorted(kept[torch.randperm(len(kept), generator=generator)[:n_on]].tolist())
    return deactivated, chosen


def build_model(settings: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=settings["hidden"], intermediate_size=settings["intermediate"],
        num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings["heads"], vocab_size=settings["vocab"], max_position_embeddings=1024,
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.train()
    return model


def _zeroing_hooks(model, deactivated: dict[int, list[int]]) -> None:
    """Forward pre-hooks that zero the deactivated neurons' site columns (the input of each mlp.down_proj)."""
    import torch

    for index, layer in enumerate(model.model.layers):
        mask = torch.ones(model.config.intermediate_size)
        mask[deactivated[index]] = 0.0

        def zero(module, args, mask=mask):
            return (args[0] * mask,) + tuple(args[1:])

        layer.mlp.down_proj.register_forward_pre_hook(zero)


def _plain(settings: dict, train: str, deactivated: dict, chosen: dict) -> tuple[object, int, int]:
    """The plain model of ``train`` mode: ``(model, trainable params, changing params)``."""
    import torch

    model = build_model(settings)
    model.requires_grad_(False)
    if train == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"],
                            layers_to_transform=settings["targets"])
        model = get_peft_model(model, config)
        _zeroing_hooks(model.base_model.model, deactivated)  # on the LoRA-wrapped down_proj: both paths see zeros
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model, trainable, trainable
    _zeroing_hooks(model, deactivated)
    changing = 0
    for layer_index in settings["targets"]:
        mlp = model.model.layers[layer_index].mlp
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.requires_grad_(True)
        if train == "neurons":
            keep = torch.zeros(settings["intermediate"])
            keep[chosen[layer_index]] = 1.0
            mlp.gate_proj.weight.register_hook(lambda g, keep=keep: g * keep[:, None])
            mlp.up_proj.weight.register_hook(lambda g, keep=keep: g * keep[:, None])
            mlp.down_proj.weight.register_hook(lambda g, keep=keep: g * keep[None, :])
            changing += 3 * len(chosen[layer_index]) * settings["hidden"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable, changing if train == "neurons" else trainable


def _fastrit(settings: dict, train: str, options: dict, deactivated: dict, chosen: dict) -> tuple[object, int, int]:
    import fastrit

    model = build_model(settings)
    kwargs = {"quantize_frozen": "nf4", "gradient_checkpointing": True,
              **{k: v for k, v in options.items() if k != "loss"}}
    if train == "neurons":
        kwargs["neurons"] = chosen
    fastrit.prepare(model, deactivate=deactivated, train_layers=list(settings["targets"]), train=train, **kwargs)
    trainable = fastrit.trainable_summary(model, print_table=False)["total"]["trainable"]
    return model, trainable, trainable


def _neuron_fingerprint(model, settings: dict, chosen: dict) -> list:
    """Per target layer, the sums of the gate/up rows and down columns of the neurons not chosen (plain only)."""
    import torch

    out = []
    for layer_index in settings["targets"]:
        mlp = model.model.layers[layer_index].mlp
        others = torch.ones(settings["intermediate"], dtype=torch.bool)
        others[chosen[layer_index]] = False
        out.append(torch.stack([mlp.gate_proj.weight[others].sum(1), mlp.up_proj.weight[others].sum(1),
                                mlp.down_proj.weight[:, others].sum(0)]).detach().clone())
    return out


def _head_only(settings: dict):
    """The floor row: a frozen model whose step is only final norm + output head + the model's loss, from a
    hidden state that requires grad (what every provider pays at the top of the network)."""
    import torch

    model = build_model(settings)
    model.requires_grad_(False)
    hidden = torch.randn(settings["batch"], settings["seq"], settings["hidden"], requires_grad=True)

    def loss_of(input_ids):
        logits = model.lm_head(model.model.norm(hidden))
        return model.loss_function(logits=logits, labels=input_ids, vocab_size=settings["vocab"])

    return model, loss_of


def worker(provider: str, settings: dict) -> dict:
    """Build, prepare and train one provider in this process; the measured row."""
    import peft  # noqa: F401  (every worker imports all that any provider uses, so the baseline RSS is the same)
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (transformers loads model classes lazily)

    import fastrit  # noqa: F401
    import fastrit.tuning  # noqa: F401

    torch.set_num_threads(THREADS)
    rss_imports = status_mib("VmRSS")
    load_start = os.getloadavg()[0]
    kind, train, options = PROVIDERS[provider]
    deactivated, chosen = neuron_choice(settings)
    transformers.logging.set_verbosity_error()
    loss_of = None
    if kind == "plain":
        model, trainable, changing = _plain(settings, train, deactivated, chosen)
    elif kind == "fastrit":
        model, trainable, changing = _fastrit(settings, train, options, deactivated, chosen)
    else:
        (model, loss_of), trainable, changing = _head_only(settings), 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if params else None
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, settings["vocab"], (settings["batch"], settings["seq"]), generator=generator)
    if options.get("loss") == "chunked":
        from fastrit.tuning import causal_lm_loss

        def loss_of(input_ids):
            return causal_lm_loss(model, input_ids, input_ids)
    elif loss_of is None:
        def loss_of(input_ids):
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    fingerprint = _neuron_fingerprint(model, settings, chosen) if provider == "plain neurons" else None

    release_freed_memory()
    rss_prepared = status_mib("VmRSS")
    peak_before = status_mib("VmHWM")
    reset_peak()

    def step() -> tuple[float, float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = loss_of(input_ids)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu_start, float(loss.detach())

    _, _, first_loss = step()  # warm-up (allocates AdamW's state)
    times, cpu_times, last_loss = [], [], first_loss
    for _ in range(settings["steps"]):
        seconds, cpu_seconds, last_loss = step()
        times.append(seconds)
        cpu_times.append(cpu_seconds)
    peak = status_mib("VmHWM")
    unchanged = None
    if fingerprint is not None:
        after = _neuron_fingerprint(model, settings, chosen)
        unchanged = all(torch.equal(x, y) for x, y in zip(fingerprint, after, strict=True))
    return {"provider": provider, "kind": kind, "train": train, "loss": options.get("loss", "model"),
            "trainable_params": trainable,
            "changing_params": changing, "rss_after_imports_mib": rss_imports, "rss_prepared_mib": rss_prepared,
            "peak_before_training_mib": peak_before, "peak_rss_mib": peak, "peak_over_start_mib": peak - rss_imports,
            "peak_over_prepared_mib": peak - rss_prepared,
            "step_s": statistics.median(times), "step_min_s": min(times), "step_max_s": max(times),
            "step_cpu_s": statistics.median(cpu_times), "steps": len(times), "first_loss": first_loss,
            "last_loss": last_loss, "plain_neurons_others_unchanged": unchanged,
            "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- in the parent

def run_provider(provider: str, settings: dict, mmap_threshold: int | None = None) -> dict:
    """Run ``provider`` in a fresh subprocess (glibc's ``MALLOC_MMAP_THRESHOLD_`` set when given); its row."""
    env = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold is not None else None
    return run_worker("benchmarks.bench_prepare", provider, settings, RESULT_MARK, env)


def add_plans(rows: list[dict], settings: dict) -> None:
    """``plan_mib``: fastrit.plan_memory's prediction for each row's settings (float32, torch AdamW, the row's
    loss, quantization and checkpointing; the plain rows' trainable tensors are the target layers' full MLP
    weights, which is train="mlp" with nothing deactivated), and ``plan_vs_measured`` against the peak over the
    import baseline."""
    import transformers

    from fastrit.tuning.plan import plan_memory

    config = transformers.LlamaConfig(
        hidden_size=settings["hidden"], intermediate_size=settings["intermediate"],
        num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings["heads"], vocab_size=settings["vocab"], max_position_embeddings=1024)
    _, chosen = neuron_choice(settings)
    for row in rows:
        row["plan_mib"] = row["plan_vs_measured"] = None
        if row["kind"] == "floor":
            continue
        options = PROVIDERS[row["provider"]][2]
        fastrit_way = row["kind"] == "fastrit"
        train = row["train"] if fastrit_way or row["train"] == "lora" else "mlp"
        plan = plan_memory(
            config, seq_len=settings["seq"], batch_size=settings["batch"], train=train,
            train_layers=list(settings["targets"]), neurons=len(chosen[settings["targets"][0]]),
            quantize_frozen=options.get("quantize_frozen", "nf4") if fastrit_way else None, optimizer="adamw",
            gradient_checkpointing=options.get("gradient_checkpointing", True) if fastrit_way else False,
            dtype="float32", loss="chunked" if options.get("loss") == "chunked" else "model", device="cpu")
        row["plan_mib"] = plan.peak_bytes / 2**20
        row["plan_vs_measured"] = row["plan_mib"] / row["peak_over_start_mib"]


def add_ratios(rows: list[dict]) -> None:
    """Ratios against the plain row of the same train mode; ``excl_head_vs_plain`` compares the peaks over the
    start minus the head + loss floor's training transient (when that row ran; rows with the model's own loss)."""
    plain = {r["train"]: r for r in rows if r["kind"] == "plain" and r["loss"] == "model"}
    floor = next((r["peak_over_prepared_mib"] for r in rows if r["kind"] == "floor"), None)
    for row in rows:
        base = plain.get(row["train"]) if row["kind"] != "floor" else None
        for key, ratio in (("peak_rss_mib", "peak_vs_plain"), ("peak_over_start_mib", "peak_over_start_vs_plain"),
                           ("step_s", "step_vs_plain")):
            row[ratio] = row[key] / base[key] if base is not None else None
        row["excl_head_vs_plain"] = None
        if base is not None and floor is not None and row["loss"] == "model" and base["peak_over_start_mib"] > floor:
            row["excl_head_vs_plain"] = (row["peak_over_start_mib"] - floor) / (base["peak_over_start_mib"] - floor)


MEDIAN_KEYS = ("peak_rss_mib", "peak_over_start_mib", "peak_over_prepared_mib", "rss_after_imports_mib",
               "rss_prepared_mib", "step_s", "step_cpu_s")
RATIO_KEYS = ("peak_vs_plain", "peak_over_start_vs_plain", "step_vs_plain", "excl_head_vs_plain")


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per provider from several rounds (each round ran every provider once, in order, so that a ratio
    compares runs close in time): medians of the measurements and of each round's ratios, every round's step time
    and step ratio kept (``*_rounds``), min/max step over all rounds. Each round gets its ratios first."""
    for rows in rounds:
        add_ratios(rows)
    merged = []
    for index, row in enumerate(rounds[0]):
        same = [rows[index] for rows in rounds]
        out = dict(row)
        for key in MEDIAN_KEYS:
            out[key] = statistics.median(r[key] for r in same)
        for key in RATIO_KEYS:
            values = [r[key] for r in same if r[key] is not None]
            out[key] = statistics.median(values) if values else None
        out["step_min_s"] = min(r["step_min_s"] for r in same)
        out["step_max_s"] = max(r["step_max_s"] for r in same)
        out["step_s_rounds"] = [r["step_s"] for r in same]
        out["step_vs_plain_rounds"] = [r["step_vs_plain"] for r in same]
        out["peak_over_start_vs_plain_rounds"] = [r["peak_over_start_vs_plain"] for r in same]
        out["rounds"] = len(same)
        merged.append(out)
    return merged


def _ratio_text(value: float | None) -> str:
    return f"{value:6.2f}x" if value is not None else "      -"


def _range_text(values: list | None) -> str:
    values = [v for v in values or [] if v is not None]
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def print_table(rows: list[dict]) -> None:
    header = (f"{'provider':36s} {'trainable':>11s} {'peak RSS MiB':>12s} {'x plain':>7s} {'over start':>10s} "
              f"{'x plain':>7s} {'excl. head':>10s} {'plan':>7s} {'step s':>8s} {'x plain':>7s} {'rounds':>11s} "
              f"{'cpu s':>7s} {'loss first -> last':>20s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['provider']:36s} {r['trainable_params']:11,d} {r['peak_rss_mib']:12.1f} "
              f"{_ratio_text(r['peak_vs_plain'])} {r['peak_over_start_mib']:10.1f} "
              f"{_ratio_text(r['peak_over_start_vs_plain'])} {_ratio_text(r['excl_head_vs_plain']):>10s} "
              f"{_ratio_text(r.get('plan_vs_measured'))} {r['step_s']:8.3f} {_ratio_text(r['step_vs_plain'])} "
              f"{_range_text(r.get('step_vs_plain_rounds')):>11s} {r['step_cpu_s']:7.2f} "
              f"{r['first_loss']:9.4f} -> {r['last_loss']:7.4f}", flush=True)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels: the peak RSS (the import baseline hatched below, the training's own part above, both labelled)
    and the median step time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 5.5))
    names = [r["provider"].replace(" (", "\n(") for r in rows]
    colours = [{"plain": "#4c72b0", "fastrit": "#55a868"}.get(r["kind"], "#999999") for r in rows]
    x = range(len(rows))
    xlabel = "provider (blue: plain transformers/PEFT, green: fastrit.prepare, grey: head + loss only)"

    axes = figure.add_subplot(1, 2, 1)
    base = [r["rss_after_imports_mib"] for r in rows]
    axes.bar(x, base, color="#dddddd", hatch="//", edgecolor="#aaaaaa", label="RSS after the imports")
    bars = axes.bar(x, [r["peak_over_start_mib"] for r in rows], bottom=base, color=colours)
    axes.bar_label(bars, [f"{r['peak_rss_mib']:.0f}\n(+{r['peak_over_start_mib']:.0f})" for r in rows], fontsize=6)
    axes.set_ylabel("peak RSS during training, MiB (lower is better)", fontsize=8)
    axes.set_title("peak RSS (in brackets: over the RSS after the imports)", fontsize=9)
    axes.legend(fontsize=7, loc="lower right")

    axes2 = figure.add_subplot(1, 2, 2)
    bars = axes2.bar(x, [r["step_s"] for r in rows], color=colours)
    axes2.bar_label(bars, [f"{r['step_s']:.2f}" for r in rows], fontsize=7)
    axes2.set_ylabel("seconds per training step, median (lower is better)", fontsize=8)
    axes2.set_title("step time (zero_grad, forward, backward, AdamW step)", fontsize=9)
    for ax in (axes, axes2):
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    figure.suptitle(title, fontsize=10)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, one step (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default: all)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="workers at a time (default 1; 2 with --quick: peaks stay per process, times are "
                             "then contended)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 65536), so that freed "
                             "blocks go back to the system and the RSS follows the live tensors; results then go to "
                             "bench_prepare_mmap.* (default: glibc's own behaviour)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every provider this many times, round by round (default 1); the table gives the "
                             "medians, and the range of the per-round step ratios against plain")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        row = worker(args.worker, json.loads(args.worker_settings))
        print_row(RESULT_MARK, row)
        return [row]

    providers = list(PROVIDERS) if args.providers is None else [p.strip() for p in args.providers.split(",")]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        parser.error(f"--providers: unknown {unknown}; expected a comma-separated subset of {list(PROVIDERS)}")
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps: expected a positive number of timed steps")
        settings["steps"] = args.steps
    s = settings
    print(f"model: Llama {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, vocab {s['vocab']}, "
          f"fp32, sdpa; batch {s['batch']} x {s['seq']} tokens; targets {s['targets']}; "
          f"{s['steps']} timed steps after 1 warm-up; {THREADS} threads; each provider in its own process",
          flush=True)
    jobs = args.jobs or (2 if args.quick else 1)
    if jobs < 1:
        parser.error("--jobs: expected a positive number")
    if args.rounds < 1:
        parser.error("--rounds: expected a positive number")
    start = time.perf_counter()

    def run(provider: str, round_: int) -> dict:
        row = run_provider(provider, settings, args.malloc_mmap_threshold)
        print(f"  {provider}: done, round {round_ + 1} of {args.rounds} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        return row

    rounds = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for round_ in range(args.rounds):
            rounds.append(list(pool.map(run, providers, [round_] * len(providers))))
    rows = merge_rounds(rounds)
    add_plans(rows, settings)
    bad = [r["provider"] for r in rows if not (math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]))]
    if bad:
        print(f"WARNING: non-finite loss for {bad}", flush=True)
    print_table(rows)

    suffix = ("_quick" if args.quick else "") + ("_mmap" if args.malloc_mmap_threshold is not None else "")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "threads": THREADS, "python": platform.python_version(),
           **{name: metadata.version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "fastrit")},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "jobs": jobs, "rounds": args.rounds, "malloc_mmap_threshold": args.malloc_mmap_threshold,
           "wall_s": time.perf_counter() - start}
    run_settings = {**settings, "lr": LR, "weight_decay": 0.0, "attn_implementation": "sdpa", "dtype": "float32",
                    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}, "deactivate_seed": 1,
                    "neuron_seed": 2, "model_seed": 0, "input_seed": 0}
    (args.out / f"bench_prepare{suffix}.json").write_text(
        json.dumps({"rows": rows, "env": env, "settings": run_settings}, indent=1) + "\n")
    with open(args.out / f"bench_prepare{suffix}.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = (f"fastrit.prepare vs plain transformers training, CPU ({THREADS} threads): Llama {s['layers']} layers, "
             f"hidden {s['hidden']}, MLP {s['intermediate']}, batch {s['batch']} x {s['seq']}, targets {s['targets']}")
    plot(rows, args.out / f"bench_prepare{suffix}.png", title)
    print(f"results in {args.out}/bench_prepare{suffix}.{{json,csv,png}} ({env['wall_s']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
