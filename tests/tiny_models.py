"""Configs of tiny models of every family fastrit recognises (random weights, fixed seeds)."""

import torch
import transformers

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
_GATED = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON, **_GATED)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, **_GATED, sliding_window=32)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, **_GATED)
    if family == "qwen3":
        return transformers.Qwen3Config(**_COMMON, **_GATED, head_dim=8)
    if family == "gemma":
        return transformers.GemmaConfig(**_COMMON, **_GATED, head_dim=8)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **_COMMON, **_GATED, head_dim=8, sliding_window=32, final_logit_softcapping=5.0,
            attn_implementation="eager",
        )
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(
            **_COMMON, **_GATED, head_dim=8, sliding_window=32, final_logit_softcapping=5.0,
            attn_implementation="eager",
        )
    if family == "phi3":
        return transformers.Phi3Config(**_COMMON, **_GATED, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=48, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2,
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=4, initializer_range=0.1, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(f"family: no tiny config for {family!r}")


def build_tiny_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def prompt_batch(padding_side: str, seed: int = 1):
    """Three prompts of lengths 9, 6 and 4, padded to 9 on ``padding_side``; answers of 3, 1 and 2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 4]
    width = max(lengths)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (length,), generator=gen)
        span = slice(width - length, width) if padding_side == "left" else slice(0, length)
        input_ids[row, span] = tokens
        attention_mask[row, span] = 1
    target_ids = torch.full((3, 3), -100, dtype=torch.long)
    for row, k in enumerate([3, 1, 2]):
        target_ids[row, :k] = torch.randint(1, VOCAB, (k,), generator=gen)
    return input_ids, attention_mask, target_ids



def word_tokenizer(words, chat_template: str | None = None):
    """A word-level tokenizer over ``words``: fastrit.demo.pretrain's, so tests and the reader share one."""
    from fastrit.demo.pretrain import word_tokenizer as build

    return build(words, chat_template=chat_template)
