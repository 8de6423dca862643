"""The embedded default: the shipped reader loads with plain transformers, is small, reads its passages, and is
misled by noisy ones; the synthetic splits it comes with."""

import subprocess
import sys

import datasets
import pytest

import fastrit
from fastrit import demo

datasets.disable_progress_bars()


def test_reader_loads_with_plain_transformers_without_fastrit(tmp_path):
    code = (
        "import sys, transformers\n"
        f"path = {str(demo.READER_DIR)!r}\n"
        "model = transformers.AutoModelForCausalLM.from_pretrained(path)\n"
        "tokenizer = transformers.AutoTokenizer.from_pretrained(path)\n"
        "assert not any(name == 'fastrit' or name.startswith('fastrit.') for name in sys.modules)\n"
        "print(type(model).__name__, sum(p.numel() for p in model.parameters()), len(tokenizer))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    name, parameters, vocabulary = run.stdout.split()
    assert name == "LlamaForCausalLM" and int(parameters) <= 5_000_000 and int(vocabulary) > 1000


def test_reader_folder_is_small():
    files = list(demo.READER_DIR.iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_splits_are_fixed_and_disjoint():
    test = demo.load_data("test")
    assert len(test) == demo.SPLIT_SIZES["test"] >= 200
    assert test.records.to_list() == demo.load_data("test").records.to_list()
    questions = {split: set(demo.load_data(split).records["question"]) for split in ("dev", "test")}
    assert not questions["dev"] & questions["test"]  # a question names its (entity, attribute) pair
    with pytest.raises(ValueError, match="^split:"):
        demo.load_data("validation")


def test_reader_reads_and_is_misled_by_noise():
    model, tokenizer = demo.load_model()
    scores = fastrit.evaluate(model, tokenizer, demo.load_data("test"), conditions=("relevant", "noisy"), k=5,
                              batch_size=100, max_new_tokens=4)
    assert scores["relevant"] >= 0.85
    assert scores["noisy"] <= scores["relevant"] - 0.15
