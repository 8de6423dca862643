"""The embedded reader on its synthetic test split: exact match and accuracy per context condition (k = 5).

Run: ``python -m benchmarks.bench_reader`` (after ``python -m fastrit.demo.pretrain``). Writes
``benchmarks/results/bench_reader_<split>.json`` with EM per condition, fastrit.evaluate's scores per condition
(accuracy, em, f1, abstain, n), how often the reader answers exactly "unknown" (``fastrit.demo.ABSTAIN``: it was
tuned for negative rejection) per condition, the number of questions, the model's size and the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import fastrit
from fastrit import data, demo

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--conditions", default="relevant,noisy,irrelevant")
    args = parser.parse_args()
    model, tokenizer = demo.load_model()
    records = demo.load_data(args.split)
    start = time.time()
    # the reader sometimes writes its evidence first (it was pretrained on some evidence-then-answer targets): room
    # for that, and the answer after the marker when it does
    scores, predictions = fastrit.evaluate(
        model, tokenizer, records, conditions=tuple(args.conditions.split(",")), k=5, batch_size=64,
        max_new_tokens=48, progress=True, answer_marker=data.ANSWER_MARKER, return_predictions=True)
    em = {condition: row["em"] for condition, row in scores.items()}
    folder_bytes = sum(p.stat().st_size for p in demo.READER_DIR.iterdir())
    result = {
        "split": args.split, "questions": len(records), "k": 5, "max_new_tokens": 48,
        "answer_marker": data.ANSWER_MARKER, "em": em, "scores": scores, "abstained": demo.abstained(predictions),
        "gap_relevant_minus_noisy": em.get("relevant", float("nan")) - em.get("noisy", float("nan")),
        "parameters": sum(p.numel() for p in model.parameters()), "reader_folder_bytes": folder_bytes,
        "seconds": round(time.time() - start, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_reader_{args.split}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
