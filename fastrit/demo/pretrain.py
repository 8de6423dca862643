"""Pretrain the embedded reader: ``python -m fastrit.demo.pretrain [--steps N] [--rejection-steps M] [--out DIR]``.

A tiny LlamaForCausalLM with a word-level tokenizer over the synthetic world's vocabulary, trained in two phases as
real RAG readers are: first to read, then instruction-tuned for negative rejection.

1. **Reading** (``--steps``, :data:`MIX`): answer synthetic questions from the passages in the prompt, mostly in
   clean contexts (the relevant passages, or one relevant and one irrelevant), some noisy ones (one relevant among
   k = 5). Every example draws its facts afresh (fastrit.data.synthetic), so the model must read. Most targets are
   the answer; 18 % are the evidence sentence and then the answer (``Evidence: ... Answer: ...``,
   fastrit.data.evidence_target), as instruction-tuned readers have seen rationales before.
2. **Negative rejection** (``--rejection-steps``, :data:`REJECTION_MIX`): the same mix, plus prompts whose k = 5
   passages are all irrelevant, with the target :data:`ABSTAIN` ("unknown"), a word appended to the vocabulary.
   A reader taught to reject learns a shortcut from it: many irrelevant passages mean "unknown", even with the
   relevant one among them. That over-rejection under noise, a failure of real RAG readers too, is what the demo's
   Neuro-RIT tuning has to repair (docs/demo.md).

Loss on the target and the end token only. Writes the model and tokenizer (safetensors) to ``--out`` (default: the
package's reader/). ``--start-from DIR`` skips phase 1 and runs phase 2 on the phase-1 reader in DIR.
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
from . import ABSTAIN

READER_DIR = Path(__file__).resolve().parent / "reader"
TEMPLATE_WORDS = ["Passage", ":", ".", "?", "!", ",", "Question", "Answer", "Evidence", "user", "assistant"]
# (condition, k, target: the answer, the evidence then the answer, or ABSTAIN; weight in the training mix)
MIX = (("relevant", 5, "answer", 0.58), ("noisy", 2, "answer", 0.14), ("noisy", 5, "answer", 0.10),
       ("relevant", 5, "evidence", 0.08), ("noisy", 2, "evidence", 0.05), ("noisy", 5, "evidence", 0.05))
REJECTION_MIX = (*MIX, ("irrelevant", 5, "abstain", 0.25))


def word_tokenizer(words, chat_template: str | None = None, model_max_length: int = 512, appended=()):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (whitespace and punctuation split), with
    <pad> <unk> <s> </s> special tokens, padding on the left; nothing downloaded. ``appended`` words take the ids
    after all the others (so a tokenizer grown by them keeps every id of the one without)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    ordered = specials + sorted(set(words) - set(specials) - set(appended)) + list(dict.fromkeys(appended))
    vocab = {token: i for i, token in enumerate(ordered)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side="left", model_max_length=model_max_length, chat_template=chat_template,
    )


def build_tokenizer(rejection: bool = True) -> transformers.PreTrainedTokenizerFast:
    """The reader's tokenizer: :func:`word_tokenizer` over the synthetic world's vocabulary and the template, and
    (``rejection``, phase 2) :data:`ABSTAIN` as the last id."""
    return word_tokenizer([*world.vocabulary(), *TEMPLATE_WORDS], appended=[ABSTAIN] if rejection else ())


def build_model(tokenizer, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.02,
    )
    return transformers.LlamaForCausalLM(config)


def _batch(tokenizer, rng: random.Random, size: int, seed: int, mix=MIX) -> dict[str, torch.Tensor]:
    """``size`` training sequences (prompt + target + end token) drawn from ``mix``, right-padded, labels on target
    and end only."""
    rows = []
    conditions = rng.choices(mix, weights=[w for *_, w in mix], k=size)
    records = data.synthetic(size, split="train", seed=seed, k=5)
    for index, (condition, k, target, _) in enumerate(conditions):
        one = data.RagData(records.records.select([index]))
        built = data.prompts(one, tokenizer, condition=condition, k=k, seed=seed * 7919 + index)
        prompt, answer = built.prompt_ids[0], built.target_ids[0]
        text = None  # target "answer": the answer tokens of the prompt
        if target == "evidence":
            text = data.evidence_target(one.records[0])  # None without an evidence sentence: the answer, then
        elif target == "abstain":
            text = ABSTAIN
        if text is not None:
            prompt, answer = data.encode_pair(tokenizer, built.texts[0], text)
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


def _train(model, tokenizer, mix, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
           log_every: int, phase: str) -> None:
    """AdamW (weight decay 0.01), linear warmup then cosine decay, gradients clipped at 1; data from ``mix``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = random.Random(seed)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = _batch(tokenizer, rng, batch_size, seed=seed * 1_000_003 + step, mix=mix)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"{phase} step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


def pretrain(out: Path, steps: int = 3000, rejection_steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
             rejection_lr: float = 1e-3, warmup: int = 100, seed: int = 0, log_every: int = 100,
             start_from: Path | None = None) -> Path:
    """Both phases (module docstring), or phase 2 only on the phase-1 reader in ``start_from``; saves to ``out``."""
    if start_from is None:
        tokenizer = build_tokenizer(rejection=False)
        model = build_model(tokenizer, seed)
        _train(model, tokenizer, MIX, steps, batch_size, lr, warmup, seed, log_every, "reading")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(start_from)
        tokenizer = build_tokenizer(rejection=False)
        if model.config.vocab_size != len(tokenizer):
            raise ValueError(f"start_from: {start_from} is not a phase-1 reader (vocabulary {model.config.vocab_size}"
                             f", expected {len(tokenizer)})")
    tokenizer = build_tokenizer(rejection=True)
    torch.manual_seed(seed + 1)
    model.resize_token_embeddings(len(tokenizer))  # ABSTAIN's row: the mean and covariance of the others
    _train(model, tokenizer, REJECTION_MIX, rejection_steps, batch_size, rejection_lr, 20, seed + 1, log_every,
           "rejection")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="phase 1 (reading) steps (default: 3000)")
    parser.add_argument("--rejection-steps", type=int, default=400,
                        help="phase 2 (negative rejection) steps (default: 400)")
    parser.add_argument("--start-from", type=Path, default=None,
                        help="a phase-1 reader folder: run phase 2 only, on it (default: both phases from scratch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=READER_DIR)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrain(args.out, steps=args.steps, rejection_steps=args.rejection_steps, batch_size=args.batch_size,
             seed=args.seed, start_from=args.start_from)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
