"""fastrit.export and save_delta / load_delta: the exported checkpoint, loaded by plain transformers in a process
where fastrit cannot be imported, and a delta loaded onto a fresh base model, both reproduce the logits of the
prepared and trained model; 4-bit models loaded through transformers are adopted without re-quantizing."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrit
from fastrit.nn import NF4Linear
from tests.tiny_models import VOCAB, build_tiny_model

DEACTIVATE = {0: [1, 5, 7], 2: [0, 3, 47]}
TRAIN_LAYERS = [1, 2]
NEURONS = {1: [2, 4, 9], 2: [1, 8]}

LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["fastrit"] = None  # this process cannot import fastrit
    import torch, transformers
    jobs = json.load(open(sys.argv[1]))
    if any(job["quantized"] for job in jobs):
        import bitsandbytes.functional as bnbf
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        def bnb_definition(A, absmax, blocksize, quant_type, shape, dtype):
            # bitsandbytes' own dequantize_4bit (its default backend), right for every shape
            code = bnbf.get_4bit_type(quant_type, device=A.device)
            return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax.float(), code, blocksize, shape,
                                            dtype)

        # bitsandbytes' AVX-512 CPU dequantize_4bit (0.49.0 to at least 0.50.2; taken where the CPU has AVX-512F)
        # indexes absmax per row, so it misreads rows that are not a whole number of blocks, as every 4-bit layer of
        # these tiny models (in_features 32 or 48, blocks of 64). Where this bitsandbytes' CPU kernel gives another
        # weight than its own definition, the definition runs in its place (tests/ops/test_nf4 compares the same way).
        probe = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))  # two blocks, two rows each
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4", compress_statistics=False)
        if not torch.equal(bnbf.dequantize_4bit(packed, state),
                           bnb_definition(packed, state.absmax, 64, "nf4", (4, 32), torch.float32)):
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", bnb_definition)
    for job in jobs:
        kwargs = {}
        if job["quantized"]:
            kwargs["device_map"] = "cpu"
        model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], **kwargs).eval()
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = False  # bitsandbytes' exact (dequantize + matmul) CPU path
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            logits = model(ids).logits
        state = {k: v for k, v in model.state_dict().items() if k.endswith(".weight") and v.dtype == torch.uint8}
        torch.save({"logits": logits, "class": type(model).__name__, "packed": state}, job["out"])
    assert "fastrit" not in sys.modules or sys.modules["fastrit"] is None
""")


def _ids(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 7), generator=gen)


def _train(model, steps: int = 2):
    """A few AdamW steps with a large learning rate, so that every trained tensor moves."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(steps):
        ids = _ids(100 + step)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _prepared(family, train, quantize, trained=True):
    kwargs = dict(deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS, train=train, quantize_frozen=quantize,
                  gradient_checkpointing=False)
    if train == "neurons":
        kwargs["neurons"] = NEURONS
    model = fastrit.prepare(build_tiny_model(family), **kwargs)
    return _train(model) if trained else model


def _load_elsewhere(tmp_path, jobs):
    """Run LOADER on ``jobs`` (dir, ids, quantized) in a fresh interpreter; its results, in order."""
    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"result{i}.pt")
        job["ids"] = job["ids"].tolist()
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "loader.py").write_text(LOADER)
    done = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "jobs.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(job["out"]) for job in jobs]


def _assert_deactivated_neurons_are_zero(out, model):
    """After training, the export holds zero rows (inputs) and columns (output) at every deactivated neuron."""
    from safetensors.torch import load_file

    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    layout = fastrit.nn.mlp_layout(model)
    prefix = next(k for k in tensors if ".0." in k).split(".0.")[0]
    for layer, indices in DEACTIVATE.items():
        mlp = f"{prefix}.{layer}.mlp"
        for name in layout.inputs:
            weight = tensors[f"{mlp}.{name}.weight"]
            weight = weight.t() if layout.conv1d else weight
            rows = [i + k * weight.shape[0] // 2 for i in indices for k in range(2)] if layout.fused else indices
            assert not weight[rows].any(), (mlp, name)
        output = tensors[f"{mlp}.{layout.output}.weight"]
        output = output.t() if layout.conv1d else output
        assert not output[:, indices].any(), mlp


CASES = [(family, train, quantize) for family in ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3")
         for train in ("mlp", "neurons", "lora") for quantize in (None, "nf4")]


def test_dense_export_reproduces_the_trained_model_without_fastrit(tmp_path):
    jobs, expected = [], []
    for i, (family, train, quantize) in enumerate(CASES):
        model = _prepared(family, train, quantize)
        ids = _ids(i)
        with torch.no_grad():
            expected.append((model(ids).logits, type(model).__name__))
        out = fastrit.export(model, tmp_path / f"export{i}")
        assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
        _assert_deactivated_neurons_are_zero(out, model)
        jobs.append({"dir": str(out), "ids": ids, "quantized": False})
    for case, (logits, cls), result in zip(CASES, expected, _load_elsewhere(tmp_path, jobs), strict=True):
        assert result["class"] == cls, case
        torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5, msg=lambda m, c=case: f"{c}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_quantized_export_holds_the_same_nf4_bytes_and_logits(tmp_path, family):
    pytest.importorskip("bitsandbytes")
    models = {train: _prepared(family, train, "nf4") for train in ("neurons", "mlp")}
    jobs, expected = [], []
    for i, (train, model) in enumerate(models.items()):
        ids = _ids(10 + i)
        with torch.no_grad():
            expected.append(model(ids).logits)
        out = fastrit.export(model, tmp_path / train, quantized=True)
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
        jobs.append({"dir": str(out), "ids": ids, "quantized": True})
    results = _load_elsewhere(tmp_path, jobs)
    for (train, model), logits, result in zip(models.items(), expected, results, strict=True):
        torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
        packed = {name: m.packed.reshape(-1) for name, m in model.named_modules() if type(m) is NF4Linear}
        layer0 = {k: v for k, v in result["packed"].items() if ".0." in k}
        assert layer0, "nothing was loaded in 4 bits"
        for key, value in layer0.items():  # layer 0 is frozen: every projection stays NF4, byte for byte
            name = key[: -len(".weight")]
            source = packed.get(name) if name in packed else None
            if source is None:  # an MLP with deactivated neurons: NeuronMLP's frozen projections
                mlp_name, proj = name.rsplit(".", 1)
                mlp = model.get_submodule(mlp_name)
                layout = fastrit.nn.mlp_layout(model)
                modules = dict(zip(layout.inputs, mlp.frozen_in, strict=True)) | {layout.output: mlp.frozen_out}
                source = modules[proj].packed.reshape(-1)
            assert torch.equal(value.reshape(-1), source), (train, key)


@pytest.mark.parametrize("train", ["mlp", "neurons", "lora"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_a_delta_on_a_fresh_base_model_reproduces_the_trained_model(tmp_path, train, quantize):
    base = build_tiny_model("qwen2")
    trained = _prepared("qwen2", train, quantize)
    path = fastrit.save_delta(trained, tmp_path / "delta.safetensors")
    restored = fastrit.load_delta(copy.deepcopy(base), path)
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, trained(ids).logits, rtol=0, atol=0)
    assert restored.fastrit_preparation.train_layers == TRAIN_LAYERS
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.parameters())
    assert path.stat().st_size < 4 * trainable + 64 * 1024 and trainable < total


def test_load_delta_refuses_another_model_a_bad_file_and_a_prepared_model(tmp_path):
    trained = _prepared("llama", "neurons", None)
    path = fastrit.save_delta(trained, tmp_path / "delta.safetensors")
    other = build_tiny_model("qwen2")
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="^base_model"):
        fastrit.load_delta(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    (tmp_path / "junk.safetensors").write_bytes(b"not a delta")
    with pytest.raises(ValueError, match="^path"):
        fastrit.load_delta(build_tiny_model("llama"), tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="^path"):
        fastrit.load_delta(build_tiny_model("llama"), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="^base_model"):
        fastrit.load_delta(trained, path)
    with pytest.raises(ValueError, match="^model"):
        fastrit.save_delta(build_tiny_model("llama"), tmp_path / "plain.safetensors")


def test_export_refuses_bad_input_and_leaves_nothing_half_written(tmp_path):
    model = _prepared("llama", "neurons", None, trained=False)
    with pytest.raises(ValueError, match="^model"):
        fastrit.export(build_tiny_model("llama"), tmp_path / "plain")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="^out_dir"):
        fastrit.export(model, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="^quantized"):
        fastrit.export(model, tmp_path / "q", quantized=True)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fastrit.export(model, tmp_path / "broken", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def _bnb_llama(tmp_path):
    import transformers

    build_tiny_model("llama").save_pretrained(tmp_path / "base")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                                             bnb_4bit_quant_type="nf4"))
    return quantized


def test_a_model_loaded_in_4bit_is_adopted_without_requantizing(tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' definition of its dequantization, not its AVX-512 CPU kernel, which misreads these rows (shorter
    # than a block): see tests/ops/test_nf4.bnb_cpu_kernel_is_right
    from tests.ops.test_nf4 import bnb_dequantize_definition as bnb_definition

    model = _bnb_llama(tmp_path)
    bytes_before = {name: m.weight.data.clone() for name, m in model.named_modules()
                    if type(m).__name__ == "Linear4bit"}
    twin = build_tiny_model("llama")  # the fp32 model holding the 4-bit model's dequantized weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in bytes_before:
                twin.get_submodule(name).weight.copy_(bnb_definition(module.weight.data, module.weight.quant_state))
    ids = _ids(7)
    from tests.tuning.test_prepare import _reference_logits

    with torch.no_grad():
        expected = _reference_logits(twin, ids, DEACTIVATE)
    fastrit.prepare(model, deactivate=DEACTIVATE, train_layers=TRAIN_LAYERS, train="neurons", neurons=NEURONS,
                    gradient_checkpointing=False)
    assert not [m for m in model.modules() if type(m).__name__ == "Linear4bit"]  # all adopted
    adopted = {}
    for name, module in model.named_modules():
        if type(module) is NF4Linear:
            adopted[name] = module.packed.reshape(-1)
    for name, data in bytes_before.items():
        mlp_name, proj = name.rsplit(".", 1)
        if name in adopted:
            assert torch.equal(adopted[name], data.reshape(-1)), name
        else:  # inside a NeuronMLP: the frozen part adopted whole, the other neurons masked
            mlp = model.get_submodule(mlp_name)
            modules = {"gate_proj": mlp.frozen_in[0], "up_proj": mlp.frozen_in[1], "down_proj": mlp.frozen_out}
            assert torch.equal(modules[proj].packed.reshape(-1), data.reshape(-1)), name
            assert mlp.frozen_keep is not None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    _train(model)  # gradients flow through the adopted 4-bit layers
    assert all(torch.equal(m.packed.reshape(-1), adopted[n]) for n, m in model.named_modules() if n in adopted)
    import datasets
    import transformers

    rows = [{"input_ids": _ids(30 + i)[0].tolist(), "labels": _ids(30 + i)[0].tolist()} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True)
    result = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows)).train()
    assert result.global_step == 1
