"""fastrit.prepare and fastrit.export on SmolLM2 (fp32, frozen layers unquantized): the prepared model is the
original with the deactivated neurons' site values zeroed by a hook, and its export, trained a step, reloads in a
process without fastrit with the same logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrit
import fastrit.models

TRAIN_LAYERS = [6, 11]
NEURONS = {6: [1, 2, 3, 500], 11: [4, 1535]}
#: fp32 logits of SmolLM2 are up to about 30: a few float32 roundings of that, after 30 layers summed differently
ATOL = 3e-4


def _deactivated() -> dict[int, list[int]]:
    """64 neurons in each of three layers (one of them trained): enough to move the logits visibly."""
    gen = torch.Generator().manual_seed(0)
    return {layer: sorted(torch.randperm(1536, generator=gen)[:64].tolist()) for layer in (3, 11, 20)}


def _hooked_logits(model, ids, mask, deactivated):
    """The definition of deactivation: the neurons' values at the input of down_proj are 0."""
    arch = fastrit.resolve_arch(model)
    def zeroing(indices: torch.Tensor):
        def hook(module, args):
            site = args[0].clone()
            site[..., indices] = 0
            return (site, *args[1:])
        return hook

    handles = [arch.mlp_out[layer].register_forward_pre_hook(zeroing(torch.tensor(indices)))
               for layer, indices in deactivated.items()]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()


def _fresh(conversion):
    """A new copy of the session's model: loaded again from the session's cache (faster than a deepcopy)."""
    return fastrit.models.load_causal_lm(conversion.gguf, dtype=torch.float32, cache_dir=conversion.cache)[0]


def _prepare(model, train):
    kwargs = dict(deactivate=_deactivated(), train_layers=TRAIN_LAYERS, train=train, quantize_frozen=None,
                  gradient_checkpointing=False)
    if train == "neurons":
        kwargs["neurons"] = NEURONS
    return fastrit.prepare(model, **kwargs)


@pytest.fixture(scope="module")
def original_logits(smollm2, prompts):
    """``(plain, with the deactivated neurons zeroed by hooks)`` logits of the session's model on the prompts."""
    model, _ = smollm2
    ids, mask, _ = prompts
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    return plain, _hooked_logits(model, ids, mask, _deactivated())


@pytest.mark.parametrize("train", ["mlp", "neurons"])
def test_prepared_model_equals_the_original_with_neurons_zeroed(smollm2_conversion, prompts, original_logits, train):
    ids, mask, _ = prompts
    plain, expected = original_logits
    prepared = _prepare(_fresh(smollm2_conversion), train)
    with torch.no_grad():
        actual = prepared(input_ids=ids, attention_mask=mask).logits
    assert (plain - expected).abs().max() > 100 * ATOL  # the deactivated neurons matter
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)
    assert any(p.requires_grad for p in prepared.parameters())


TEXT = "Question: When was the Eiffel Tower completed?\nAnswer:"
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["fastrit"] = None  # this process cannot import fastrit
    import torch, transformers
    job = json.load(open(sys.argv[1]))
    model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["dir"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(job["ids"]), attention_mask=torch.tensor(job["mask"])).logits
    torch.save({"logits": logits, "class": type(model).__name__, "dtype": str(model.dtype),
                "tokens": tokenizer(job["text"]).input_ids}, job["out"])
""")


def test_export_of_a_trained_prepared_model_reloads_without_fastrit(smollm2, smollm2_conversion, prompts, tmp_path):
    _, tokenizer = smollm2
    ids, mask, _ = prompts
    prepared = _prepare(_fresh(smollm2_conversion), "mlp")
    with torch.no_grad():
        untrained = prepared(input_ids=ids, attention_mask=mask).logits
    optimizer = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-3)
    prepared.train()
    logits = prepared(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                             reduction="none")[mask[:, 1:].flatten().bool()].mean()
    loss.backward()
    optimizer.step()
    prepared.eval()
    with torch.no_grad():
        trained = prepared(input_ids=ids, attention_mask=mask).logits
    assert (trained - untrained).abs().max() > 1e-2  # the step changed what the export must carry

    out = fastrit.export(prepared, tmp_path / "export", tokenizer=tokenizer)
    try:
        result = _load_elsewhere(out, ids, mask, tmp_path)
    finally:
        shutil.rmtree(out)  # 540 MB
    assert result["class"] == "LlamaForCausalLM" and result["dtype"] == "torch.float32"
    assert result["tokens"] == tokenizer(TEXT).input_ids
    torch.testing.assert_close(result["logits"], trained, rtol=0, atol=ATOL)


def _load_elsewhere(out, ids, mask, tmp_path) -> dict:
    """LOADER's result for the export ``out`` in a fresh interpreter."""
    job = {"dir": str(out), "ids": ids.tolist(), "mask": mask.tolist(), "text": TEXT, "out": str(tmp_path / "r.pt")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "loader.py").write_text(LOADER)
    done = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "job.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(job["out"])
