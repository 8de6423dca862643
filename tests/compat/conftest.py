"""Tiny GPT-2, GPT-Neo and BERT models and tokenizers for the knowledge-neurons drop-in (nothing downloaded).

GPT-2's MLP width is left at its default (4 x hidden), the width the knowledge-neurons package assumes for GPT
models; models are saved with save_pretrained and loaded back.
"""

import pytest
import torch
import transformers

WORDS = (
    "the capital of france is paris rome berlin madrid city a an in on and country river mountain "
    "where lives named famous big old new north south river sea"
).split()


@pytest.fixture(scope="session")
def word_tok():
    from tests.tiny_models import word_tokenizer

    return word_tokenizer(WORDS)


@pytest.fixture(scope="session")
def bert_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS), "."]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def _config(kind: str, vocab: int) -> transformers.PretrainedConfig:
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4, initializer_range=0.2,
            bos_token_id=2, eos_token_id=3,
        )
    if kind == "gpt_neo":
        # window 6: the longer prompts below reach past the local attention window
        return transformers.GPTNeoConfig(
            vocab_size=vocab, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4,
            attention_types=[[["global", "local"], 2]], window_size=6, initializer_range=0.2,
            bos_token_id=2, eos_token_id=3,
        )
    if kind == "bert":
        return transformers.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, initializer_range=0.2,
        )
    raise ValueError(kind)


@pytest.fixture(scope="session")
def kn_model(tmp_path_factory, word_tok, bert_tok):
    """``kn_model(kind)`` -> a fresh copy (eval mode) of the saved tiny ``gpt2`` / ``gpt_neo`` / ``bert`` model."""
    saved = {}

    def get(kind: str):
        if kind not in saved:
            torch.manual_seed(0)
            vocab = len(bert_tok) if kind == "bert" else len(word_tok)
            config = _config(kind, vocab)
            model_class = transformers.BertForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
            model = model_class.from_config(config) if kind != "bert" else model_class(config)
            saved[kind] = tmp_path_factory.mktemp(f"kn-{kind}")
            model.save_pretrained(saved[kind])
        if kind == "bert":
            return transformers.BertForMaskedLM.from_pretrained(saved[kind]).eval()
        return transformers.AutoModelForCausalLM.from_pretrained(saved[kind]).eval()

    return get
