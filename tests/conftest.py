"""Shared fixtures: tiny transformers models built from configs with fixed seeds.

Models are saved with ``save_pretrained`` and loaded back with ``AutoModelForCausalLM``, so the real
loading code runs; nothing is downloaded.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``family -> directory`` of a saved tiny model, built on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny_model(family).save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """``tiny_model(family, dtype=torch.float32)`` -> a loaded tiny causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        key = (family, dtype)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=dtype)
            cache[key] = model.eval()
        return cache[key]

    return get
