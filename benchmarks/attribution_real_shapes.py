"""Attribution at real shapes: SmolLM2-135M (30 layers) with 1- and 5-token answers, and Llama-3-8B's layer shape
truncated to a few layers. Part of ``python -m benchmarks.bench_attribution`` (``--real-shapes``).

Per scenario, providers (positions "last", objective "logprob", a random prompt of the scenario's length):

- ``forward``: one no-grad forward of prompt + answer: the unit of "forwards of time" and "forwards of FLOPs";
- ``fastrit (20 riemann_right)``: today's default rule;
- ``fastrit (auto)``: ``steps="auto"`` at the default ``delta_tol``;
- ``reference loop (20 riemann_right)``: :func:`fastrit.attribute_reference`, the knowledge-neurons way (10 steps per
  forward and backward, as the package batches them). Each layer's loop runs the whole model forward and the
  backward down to that layer, a cost linear in the layer's depth, so it is timed on :data:`REFERENCE_LAYERS` evenly
  spaced layers (the first and the last: their mean is the mean over all layers) and scaled to all of them
  (``reference_layers_timed``); its max |delta| over all layers is fastrit's at the same 20 steps, which the row
  checks equal to the loop's own on the timed layers (``reference_delta_difference``, absolute), as it checks the
  scores (``reference_score_rel_error``: max |difference| / max |score| of fastrit's 20-step scores).

Each row: seconds (median of ``repeats``), forwards of time and of FLOPs, max |delta| over
the layers, the reference loop's time over the row's (``speedup``) with whether the row's max |delta| is no larger
than the loop's (``delta_within_reference``), and peak memory (CPU: the process's peak RSS during the call, which
includes the model's weights; CUDA: ``torch.cuda.max_memory_allocated``). SmolLM2 uses its real weights when the
registry model can be loaded (fastrit.models.load_smollm2), random weights of its shape otherwise (``weights``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import fastrit
from benchmarks._process import release_freed_memory, reset_peak, status_mib

# (layers, hidden, intermediate, heads, kv heads, vocabulary, prompt tokens, answer token counts)
SHAPES = {
    "smollm2": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, prompt=300,
                    answers=(1, 5), real="smollm2"),
    "llama3_8b": dict(layers=2, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, prompt=128,
                      answers=(1,), real=None),
}
#: on a GPU, Llama-3-8B's shape deeper and at a longer prompt (about 4 GB of bf16 weights at 8 layers)
CUDA_SHAPES = {**SHAPES, "llama3_8b": {**SHAPES["llama3_8b"], "layers": 8, "prompt": 512, "answers": (1, 5)}}
QUICK_SHAPES = {
    "smollm2": dict(layers=3, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=96, prompt=20, answers=(1, 3),
                    real=None),
}
STEPS = 20
REFERENCE_LAYERS = 2


def _random_model(shape: dict, dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(2048, shape["prompt"] + 16), tie_word_embeddings=shape["real"] == "smollm2",
        initializer_range=0.02,
    )
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(dtype).eval()


def load_model(shape: dict, dtype: torch.dtype, device: str) -> tuple[transformers.PreTrainedModel, str]:
    """The scenario's model and where its weights come from ("real" or "random")."""
    if shape["real"] == "smollm2":
        try:
            from fastrit.models import load_smollm2

            model, _ = load_smollm2(dtype=dtype)
            return model.to(device).eval(), "real"
        except Exception as error:  # noqa: BLE001 - any failure to fetch or load means: random weights
            print(f"  (SmolLM2 not available: {error}; random weights of its shape)")
    return _random_model(shape, dtype, device), "random"


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mib("VmHWM")


def _reset_peak(device: str) -> None:
    release_freed_memory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()


def _timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[list[float], object, float]:
    """Wall-clock seconds of ``repeats`` calls, the last call's result and the peak memory over them."""
    times, result = [], None
    _reset_peak(device)
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, result, _peak_mib(device)


def _flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def scenario_rows(name: str, shape: dict, answer: int, model, weights: str, repeats: int, device: str) -> list[dict]:
    """The rows of one scenario: forward, fastrit at 20 right-Riemann steps, fastrit auto, the reference loop."""
    gen = torch.Generator().manual_seed(answer)
    ids = torch.randint(3, shape["vocab"], (1, shape["prompt"]), generator=gen).to(device)
    target = torch.randint(3, shape["vocab"], (1, answer), generator=gen).to(device)
    common = dict(target_ids=target, positions="last", objective="logprob")
    whole = torch.cat([ids, target[:, :-1]], dim=1)

    def forward():
        with torch.no_grad():
            return model(whole, use_cache=False)

    layers = shape["layers"]
    timed_layers = sorted({round(i * (layers - 1) / max(1, REFERENCE_LAYERS - 1)) for i in range(REFERENCE_LAYERS)})
    providers = {
        "forward": (forward, repeats),
        f"fastrit ({STEPS} riemann_right)": (lambda: fastrit.attribute(model, ids, steps=STEPS, **common), repeats),
        "fastrit (auto)": (lambda: fastrit.attribute(model, ids, steps="auto", **common), repeats),
        f"reference loop ({STEPS} riemann_right)": (
            lambda: fastrit.attribute_reference(model, ids, steps=STEPS, steps_per_batch=10, layers=timed_layers,
                                                **common), repeats),
    }
    rows, results = [], {}
    for provider, (fn, runs) in providers.items():
        times, result, peak = _timed(fn, runs, device)
        row = {"scenario": f"{name}_{answer}tok", "provider": provider, "weights": weights,
               "layers": layers, "prompt_tokens": shape["prompt"], "answer_tokens": answer,
               "median_s": statistics.median(times), "runs": runs, "gflops": _flops(fn) / 1e9,
               "peak_mib": peak, "device": device}
        if isinstance(result, fastrit.NeuronAttribution):
            results[provider] = result
            row["max_abs_delta"] = float(result.delta.abs().max())
            row["mean_steps_used"] = float(result.steps_used.float().mean())
        rows.append(row)
    fwd, fixed, ref = rows[0], rows[1], rows[-1]
    # the loop on all layers: its time and FLOPs scale with the layers; its delta is fastrit's at the same rule
    scale = layers / len(timed_layers)
    fixed_result, ref_result = results[fixed["provider"]], results[ref["provider"]]
    own = ref_result.delta.abs()
    columns = [fixed_result.layers.index(layer) for layer in timed_layers]
    same_layers = fixed_result.delta[:, columns].abs()
    scores, want = fixed_result.scores[:, columns], ref_result.scores
    ref.update(reference_score_rel_error=float((scores - want).abs().max() / want.abs().max()))
    ref.update(median_s=ref["median_s"] * scale, gflops=ref["gflops"] * scale, max_abs_delta=fixed["max_abs_delta"],
               reference_layers_timed=timed_layers,
               reference_delta_difference=float((own - same_layers).abs().max()))
    for row in rows[1:]:
        row["forwards_of_time"] = row["median_s"] / fwd["median_s"]
        row["forwards_of_flops"] = row["gflops"] / fwd["gflops"]
        row["speedup"] = ref["median_s"] / row["median_s"]
        row["delta_within_reference"] = row["max_abs_delta"] <= ref["max_abs_delta"]
    for row in rows:
        print(f"  {row['scenario']:16s} {row['provider']:34s} {row['median_s']:9.3f} s {row['gflops']:10.2f} GFLOP "
              f"{row.get('max_abs_delta', float('nan')):.2e} |delta| {row['peak_mib']:8.0f} MiB "
              f"{row.get('speedup', float('nan')):7.1f}x", flush=True)
    return rows


def run_real_shapes(repeats: int, quick: bool, device: str, only: list[str] | None = None) -> list[dict]:
    """Every scenario's rows (fp32 on the CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    shapes = QUICK_SHAPES if quick else CUDA_SHAPES if device == "cuda" else SHAPES
    for name, shape in shapes.items():
        if only and name not in only:
            continue
        model, weights = load_model(shape, dtype, device)
        print(f"{name}: {shape['layers']} layers, hidden {shape['hidden']}, MLP {shape['intermediate']}, "
              f"vocabulary {shape['vocab']}, {shape['prompt']}-token prompt, {weights} weights, {dtype}")
        for answer in shape["answers"]:
            rows.extend(scenario_rows(name, shape, answer, model, weights, repeats, device))
        del model
        release_freed_memory()
    return rows
