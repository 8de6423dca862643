"""Pretrain the embedded reader: ``python -m fastrit.demo.pretrain [--steps N] [--out DIR] [--seed S]``.

A tiny LlamaForCausalLM with a word-level tokenizer over the synthetic world's vocabulary, trained to answer
synthetic questions from the passages in its prompt, as real RAG readers are trained: mostly on clean contexts
(the relevant passages, or one relevant and one irrelevant), some noisy ones (one relevant among k = 5). Every
example draws its facts afresh (fastrit.data.synthetic), so the model must read. Most targets are the answer; 18 %
are the evidence sentence and then the answer (``Evidence: ... Answer: ...``, fastrit.data.evidence_target), as
instruction-tuned readers have seen rationales before: Neuro-RIT's distill stage then reinforces a format the reader
knows instead of teaching a tiny model to copy sentences from scratch. Loss on the target and the end token only.
Writes the model and tokenizer (safetensors) to ``--out`` (default: the package's reader/).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import transformers

from .. import data
from ..data import world

READER_DIR = Path(__file__).resolve().parent / "reader"
TEMPLATE_WORDS = ["Passage", ":", ".", "?", "!", ",", "Question", "Answer", "Evidence", "user", "assistant"]
# (condition, k, target: the answer or the evidence then the answer, share of the training examples)
MIX = (("relevant", 5, "answer", 0.58), ("noisy", 2, "answer", 0.14), ("noisy", 5, "answer", 0.10),
       ("relevant", 5, "evidence", 0.08), ("noisy", 2, "evidence", 0.05), ("noisy", 5, "evidence", 0.05))


def word_tokenizer(words, chat_template: str | None = None, model_max_length: int = 512):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (whitespace and punctuation split), with
    <pad> <unk> <s> </s> special tokens, padding on the left; nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(words) - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", model_max_length=model_max_length, chat_template=chat_template,
    )


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The reader's tokenizer: :func:`word_tokenizer` over the synthetic world's vocabulary and the template."""
    return word_tokenizer([*world.vocabulary(), *TEMPLATE_WORDS])


def build_model(tokenizer, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.02,
    )
    return transformers.LlamaForCausalLM(config)


def _batch(tokenizer, rng: random.Random, size: int, seed: int) -> dict[str, torch.Tensor]:
    """``size`` training sequences (prompt + target + end token), right-padded, labels on target and end only."""
    rows = []
    conditions = rng.choices(MIX, weights=[w for *_, w in MIX], k=size)
    records = data.synthetic(size, split="train", seed=seed, k=5)
    for index, (condition, k, target, _) in enumerate(conditions):
        one = data.RagData(records.records.select([index]))
        built = data.prompts(one, tokenizer, condition=condition, k=k, seed=seed * 7919 + index)
        prompt, answer = built.prompt_ids[0], built.target_ids[0]
        evidence = data.evidence_target(one.records[0]) if target == "evidence" else None
        if evidence is not None:
            prompt, answer = data.encode_pair(tokenizer, built.texts[0], evidence)
        answer = answer + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, width), tokenizer.pad_token_id)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain(out: Path, steps: int = 3000, batch_size: int = 64, lr: float = 2e-3, warmup: int = 100,
             seed: int = 0, log_every: int = 100) -> Path:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = _batch(tokenizer, rng, batch_size, seed=seed * 1_000_003 + step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=READER_DIR)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrain(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
