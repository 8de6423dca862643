"""fastrit.plan_attribution: its terms against the tensors the engine really holds (tiny models), Llama-3-8B's figure
on CUDA, how settings move the terms, bad input, and `fastrit plan --attribute`. The plan against measured peak RSS is
benchmarks/bench_attribution_memory.py (minutes, not a test)."""

import pytest
import torch

import fastrit
from fastrit.attribution import engine
from fastrit.attribution.plan import AUTO_ROWS_PER_LAYER, CPU_BASELINE_BYTES, PERSISTENT_PARTS, plan_attribution
from fastrit.cli import main
from fastrit.memory import GIB, stored_bytes
from tests.tiny_models import VOCAB, build_tiny_model, tiny_config

TOKENS = 24


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ids(answer_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(3, VOCAB, (1, TOKENS), generator=generator),
            torch.randint(3, VOCAB, (1, answer_tokens), generator=generator))


def _saved_bytes(model: torch.nn.Module, answer_tokens: int, **kwargs) -> int:
    """Bytes of the distinct storages autograd saves during ``fastrit.attribute`` (parameters and buffers not
    counted)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ids, target = _ids(answer_tokens)
        fastrit.attribute(model, ids, target_ids=target, **kwargs)
    return sum(saved.values())


def test_llama_3_8b_bf16_t512_fits_20_gib_on_cuda():
    plan = plan_attribution("llama-3-8b", tokens=512, steps=20, positions="last", dtype="bfloat16", device="cuda")
    parts = plan.breakdown
    assert plan.peak_bytes <= 20 * GIB
    assert 8_030_261_248 * 2 <= parts["weights"] < 8_030_261_248 * 2 + 2**20  # the parameters, and inv_freq
    assert parts["process baseline"] == 0 and plan.trainable_params == 0
    assert plan.settings["chunk_rows"] == 315 and plan.settings["rows"] == 32 * 21  # the engine's 2 GiB default
    transient = max(parts["clean pass"], parts["float32 projection"],
                    parts["chunk: saved activations"] + parts["chunk: logits and workspace"])
    assert plan.peak_bytes == sum(parts[k] for k in PERSISTENT_PARTS) + transient
    assert parts["chunk: logits and workspace"] == 12 * 315 * 128256  # float32 log-softmax and two gradients
    assert "chunk: saved activations" in plan.table() and "upper bound" in str(plan)


def test_cpu_adds_the_process_baseline_only():
    gpu = plan_attribution("llama-3-8b", tokens=256, dtype="float32", device="cuda")
    cpu = plan_attribution("llama-3-8b", tokens=256, dtype="float32", device="cpu")
    assert cpu.peak_bytes - gpu.peak_bytes == CPU_BASELINE_BYTES == cpu.breakdown["process baseline"]
    assert {**cpu.breakdown, "process baseline": 0} == gpu.breakdown
    assert gpu.breakdown["float32 projection"] < 2**30  # float32 weights: no float32 copy of a projection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_terms_are_the_engines_tensors(tiny_model, dtype):
    """Weights (a model loaded in ``dtype``), key/value cache, sites and entry states as _CleanPass and _LayerTerms
    hold them (storages, since the entry states are views), and the engine's default batch size."""
    model = tiny_model("llama", dtype)
    ids, target = _ids(2)
    plan = plan_attribution(tiny_config("llama"), tokens=TOKENS, answer_tokens=2, dtype=_dtype_name(dtype))
    call = engine.prepare_call(model, ids, None, target, "logprob", "last", 20, None, None, None)
    arch, example = call.arch, call.examples[0]
    clean = engine._CleanPass(arch, example, call.layers, "logprob")
    terms = {layer: engine._LayerTerms(arch, clean, layer, "torch") for layer in call.layers}
    parts = plan.breakdown
    assert parts["weights"] == stored_bytes(model)
    kv = {id(t.untyped_storage()): t.untyped_storage().nbytes() for pair in clean.prefix_kv for t in pair}
    assert parts["key/value cache"] == sum(kv.values())
    held = {}
    for layer, term in terms.items():
        for tensor in (clean.site[layer], clean.entry_hidden[layer], term.site, term.site_out):
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    assert parts["sites and entry states"] == sum(held.values())
    rows = len(call.layers) * (len(call.alphas) + 1)
    n = example.length - example.first_position
    assert plan.settings["chunk_rows"] == engine._default_batch_size(arch, n, rows, dtype.itemsize) == rows
    assert plan.settings["recomputed_tokens"] == n == 2


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("positions, answer_tokens", [("last", 1), ("answer", 3), ("all", 2)])
def test_chunk_saved_activations_bound_what_autograd_saves(family, positions, answer_tokens):
    """One chunk (the rows of layer 0, which run through every layer above: the bound is tight there); the plan's
    saved activations plus the float32 log-softmax against the storages autograd saves: at least, at most 20 %
    more."""
    for dtype in (torch.float32, torch.bfloat16):
        model = build_tiny_model(family).to(dtype)
        measured = _saved_bytes(model, answer_tokens, positions=positions, layers=[0], steps=20)
        plan = plan_attribution(tiny_config(family), tokens=TOKENS, answer_tokens=answer_tokens, positions=positions,
                                layers=[0], dtype=_dtype_name(dtype))
        rows = plan.settings["chunk_rows"]
        assert rows == 21
        softcapped = 2 if getattr(model.config, "final_logit_softcapping", None) else 1  # the head's tanh
        planned = plan.breakdown["chunk: saved activations"] + softcapped * rows * answer_tokens * VOCAB * 4
        assert measured <= planned <= 1.2 * measured, (dtype, measured, planned)


def test_settings_move_the_terms_as_the_engine_does():
    base = dict(config="llama-3-8b", tokens=512, dtype="bfloat16")
    last = plan_attribution(**base)
    assert plan_attribution(**base, batch_size=64).breakdown["chunk: saved activations"] < \
        last.breakdown["chunk: saved activations"]
    everything = plan_attribution(**base, positions="all")
    assert everything.breakdown["key/value cache"] == 0 and everything.settings["recomputed_tokens"] == 512
    assert everything.settings["chunk_rows"] == 1  # one 512-token row already fills the 2 GiB budget
    auto = plan_attribution(**base, steps="auto", batch_size=10_000)
    assert auto.settings["rows"] == 32 * AUTO_ROWS_PER_LAYER and auto.settings["chunk_rows"] == 32 * 65
    from fastrit.attribution.integration import AUTO_STEPS

    assert AUTO_ROWS_PER_LAYER >= max(AUTO_STEPS) + 1
    # objective "prob" scores the first answer token after the prompt only: more answer tokens cost nothing
    prob = [plan_attribution(**base, answer_tokens=k, objective="prob").breakdown for k in (1, 4)]
    assert prob[0] == prob[1]
    longer = plan_attribution(**base, answer_tokens=4)  # 4 tokens per row: the default batch has a quarter the rows
    assert longer.settings["chunk_rows"] == 2**31 // (4 * 32 * (12 * 4096 + 4 * 14336) * 2) == 78
    assert plan_attribution(**base, answer_tokens=4, batch_size=315).peak_bytes > last.peak_bytes
    layer_31 = plan_attribution(**base, layers=[31])
    assert layer_31.breakdown["chunk: saved activations"] < last.breakdown["chunk: saved activations"] / 10


def test_bad_input_names_the_argument():
    for kwargs, argument in [(dict(config="llama-9000"), "config"), (dict(config=3), "config"),
                             (dict(config=tiny_config("llama").__class__.__base__()), "config"),
                             (dict(tokens=0), "tokens"), (dict(tokens=9000), "tokens"),
                             (dict(answer_tokens=1.5), "answer_tokens"), (dict(steps=0), "steps"),
                             (dict(steps="many"), "steps"), (dict(positions="first"), "positions"),
                             (dict(layers=[99]), "layers"), (dict(layers=3), "layers"),
                             (dict(batch_size=0), "batch_size"), (dict(dtype="int8"), "dtype"),
                             (dict(device="tpu"), "device"), (dict(objective="nll"), "objective")]:
        with pytest.raises((ValueError, TypeError), match=f"^{argument}"):
            plan_attribution(**{"config": "llama-3-8b", **kwargs})
    with pytest.raises(ValueError, match="^tokens: .*sliding"):
        plan_attribution(tiny_config("mistral"), tokens=40)


def test_cli_prints_the_attribution_plan(capsys):
    assert main(["plan", "llama-3-8b", "--attribute"]) == 0
    text = capsys.readouterr().out
    assert "512 prompt + 1 answer tokens" in text and "chunks of 315 of 672 IG rows" in text
    peak = [line for line in text.splitlines() if line.startswith("peak")]
    assert len(peak) == 1 and float(peak[0].split()[1]) <= 20
    assert main(["plan", "llama-3-8b", "--attribute", "--steps", "auto", "--tokens", "2048", "--device", "cpu"]) == 0
    assert "process baseline" in capsys.readouterr().out
    assert main(["plan", "llama-3-8b", "--attribute", "--tokens", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrit plan: error:") and "tokens" in err[0], err
