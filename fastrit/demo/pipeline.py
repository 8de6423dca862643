"""``fastrit demo``: Neuro-RIT end to end on the embedded default, beside a plain baseline, with a report.

Phases, each timed and its peak memory recorded:

1. ``evaluate before``: exact match and accuracy (a gold answer contained in the answer) of the shipped reader on
   the test split, per condition (relevant, noisy, irrelevant), and how often it answers ``ABSTAIN`` ("unknown":
   the reader was tuned for negative rejection);
2. ``mine``: fastrit.mine on the first ``mine_records`` train records (IG with ``mine_steps`` steps);
3. ``tune``: Neuro-RIT (fastrit.tune): the irrelevant-exclusive neurons deactivated, frozen layers in NF4, the target
   layers' MLPs trained, stage 1 "denoise" then stage 2 "distill", ``steps`` optimizer steps each;
4. ``baseline``: the same budget without the method: a fresh copy of the reader, the same target layers' MLPs
   trainable (nothing deactivated), ``2 x steps`` steps of answer-only targets on the same noisy-context prompts;
5. ``evaluate after``: both tuned models on the test split, the same way;
6. ``export``: the Neuro-RIT model written as a plain transformers checkpoint, loaded in a fresh Python process that
   never imports fastrit, and its answers to ``export_questions`` test questions compared with the tuned model's.

Every model is scored the same way: greedy generation of up to ``max_new_tokens`` tokens; when the continuation
holds the answer marker (``Answer:``, which a model tuned by stage 2 writes after its evidence) the answer is what
follows it, else the whole continuation (fastrit.evaluate's ``answer_marker``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from .. import data as rag
from ..data import ANSWER_MARKER
from ..evaluate import evaluate, greedy_continuations
from ..mining import mine
from ..tuning import export, prepare, trainable_summary
from . import abstained, load_data, load_model

__all__ = ["DemoSettings", "run_demo"]

CONDITIONS = ("relevant", "noisy", "irrelevant")


@dataclass
class DemoSettings:
    """The demo's budget (defaults: a few minutes on a 2-core CPU)."""

    mine_records: int = 400
    mine_steps: int = 8
    train_records: int = 4000
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-3
    test_records: int | None = None
    max_new_tokens: int = 48
    export_questions: int = 20
    seed: int = 0


@dataclass
class _Meter:
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float | None] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, say) -> Iterator[None]:
        say(f"[{len(self.seconds) + 1}] {name} ...")
        _reset_peak()
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        self.peak_mib[name] = _peak_mib()
        say(f"    {name}: {self.seconds[name]:.1f} s")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: restart the process's peak resident set size (VmHWM) from its current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib() -> float | None:
    """The process's peak RSS since :func:`_reset_peak` (Linux; None elsewhere), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class _LossLog(transformers.TrainerCallback):
    """The training loss the Trainer logs, per stage (one Trainer per stage, in order)."""

    def __init__(self, stages: list[str]):
        self.stages = list(stages)
        self.losses: dict[str, list[list[float]]] = {}
        self._current = -1

    def on_train_begin(self, args, state, control, **kwargs):
        self._current += 1
        self.losses[self.stages[self._current]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self._current >= 0:
            self.losses[self.stages[self._current]].append([state.global_step, float(logs["loss"])])


def _subset(split: str, n: int | None) -> rag.RagData:
    full = load_data(split)
    return full if n is None else rag.RagData(full.records.select(range(min(n, len(full)))))


def _score(model, tokenizer, test: rag.RagData, settings: DemoSettings, progress: bool):
    """``(EM, accuracy, share of answers that are ABSTAIN (fastrit.demo.abstained), predictions)``, each per
    condition."""
    scores, predictions = evaluate(model, tokenizer, test, conditions=CONDITIONS, k=5, batch_size=64,
                                   max_new_tokens=settings.max_new_tokens, seed=settings.seed, progress=progress,
                                   answer_marker=ANSWER_MARKER, return_predictions=True)
    em = {condition: row["em"] for condition, row in scores.items()}
    accuracy = {condition: row["accuracy"] for condition, row in scores.items()}
    return em, accuracy, abstained(predictions), predictions


def _tune(model, tokenizer, train, sets, stages, steps, settings, out: Path, progress: bool, **prepare_kwargs):
    from ..tuning.trainer import tune

    log = _LossLog(stages)
    tune(model, tokenizer, train, sets, stages=stages, output_dir=out, max_steps=steps,
         batch_size=settings.batch_size, learning_rate=settings.learning_rate, warmup=0.1, save_steps=10**6,
         logging_steps=max(1, steps // 10), seed=settings.seed,
         progress=progress, callbacks=[log], **prepare_kwargs)
    return log.losses


_EXPORT_CHECK = """
import json, sys
import torch, transformers
assert "fastrit" not in sys.modules
folder, prompts = sys.argv[1], json.loads(sys.stdin.read())
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
answers = []
for prompt in prompts:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=int(sys.argv[2]), do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answers.append(out[0, ids["input_ids"].shape[1]:].tolist())
print(json.dumps({"answers": answers, "fastrit_imported": "fastrit" in sys.modules}))
"""


def _check_export(model, tokenizer, folder: Path, test: rag.RagData, settings: DemoSettings) -> dict:
    """Greedy continuations of ``export_questions`` noisy test prompts from the tuned model here and from the
    export in a fresh process without fastrit; how many are the same, token for token."""
    built = rag.prompts(rag.RagData(test.records.select(range(min(settings.export_questions, len(test))))),
                        tokenizer, condition="noisy", k=5, seed=settings.seed)
    model.eval()
    ours = []
    for row in range(len(built)):  # one prompt at a time, no padding: as the check below runs the export
        with torch.inference_mode():
            new = greedy_continuations(model, built.tensors([row]), settings.max_new_tokens, built.pad_token_id,
                                       tokenizer.eos_token_id)
        ours.append(new[0].tolist())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # an absolute path: the check runs in another working directory, and a relative one would read as a Hub id
    done = subprocess.run([sys.executable, "-c", _EXPORT_CHECK, str(folder.resolve()), str(settings.max_new_tokens)],
                          input=json.dumps(built.texts), capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if done.returncode:
        raise RuntimeError(f"the export did not load in plain transformers:\n{done.stderr[-3000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    same = sum(a == b for a, b in zip(ours, theirs["answers"], strict=True))
    return {"questions": len(ours), "same_answers": same, "fastrit_imported": theirs["fastrit_imported"],
            "examples": [{"question": test.records[built.records[i]]["question"],
                          "answer": tokenizer.decode(ours[i], skip_special_tokens=True)}
                         for i in range(min(3, len(ours)))]}


def run_demo(out_dir: str | os.PathLike = "demo-output", settings: DemoSettings | None = None, *,
             progress: bool = True, say=print) -> dict:
    """Run the demo (module docstring) and write its report to ``out_dir`` (see fastrit.demo.report); returns the
    report as a dict (also ``out_dir/report.json``). ``out_dir`` must be new or empty; it appears only when the
    demo has finished (an error leaves nothing behind)."""
    settings = settings or DemoSettings()
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"out_dir: {str(final)!r} exists and is not an empty folder")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # everything is written here first and renamed to out_dir at the end: an error leaves nothing half-written
        out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as error:
        raise OSError(f"out_dir: cannot write in {str(final.parent)!r}: {error.strerror or error}") from error
    try:
        report = _run(out, settings, progress, say)
        if final.exists():
            final.rmdir()  # empty, checked above
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return report


def _run(out: Path, settings: DemoSettings, progress: bool, say) -> dict:
    from .report import write_report

    torch.manual_seed(settings.seed)
    meter = _Meter()
    model, tokenizer = load_model()
    test = _subset("test", settings.test_records)
    train = _subset("train", settings.train_records)
    with tempfile.TemporaryDirectory(dir=out) as work:
        work = Path(work)
        with meter.phase("evaluate before", say):
            before, accuracy_before, abstained_before, _ = _score(model, tokenizer, test, settings, progress)
        with meter.phase("mine", say):
            sets = mine(model, tokenizer, _subset("train", settings.mine_records), steps=settings.mine_steps,
                        progress=progress)
            sets.plot(out)
        baseline_model = copy.deepcopy(model)
        with meter.phase("tune (Neuro-RIT)", say):
            losses = _tune(model, tokenizer, train, sets, ["denoise", "distill"], settings.steps, settings,
                           work / "neuro-rit", progress)
        with meter.phase("baseline", say):
            prepare(baseline_model, deactivate=None, train_layers=list(sets.target_layers), train="mlp")
            baseline_losses = _tune(baseline_model, tokenizer, train, None, ["denoise"], 2 * settings.steps,
                                    settings, work / "baseline", progress)
        with meter.phase("evaluate after", say):
            after, accuracy_after, abstained_after, predictions = _score(model, tokenizer, test, settings, progress)
            baseline, accuracy_baseline, abstained_baseline, _ = _score(baseline_model, tokenizer, test, settings,
                                                                        progress)
        with meter.phase("export", say):
            export(model, out / "export", tokenizer=tokenizer)
            exported = _check_export(model, tokenizer, out / "export", test, settings)
    summary = trainable_summary(model, print_table=False)
    sizes = sets.set_sizes()
    report = {
        "em_before": before, "em_after": after, "em_baseline": baseline,
        "accuracy_before": accuracy_before, "accuracy_after": accuracy_after, "accuracy_baseline": accuracy_baseline,
        "abstained_before": abstained_before, "abstained_after": abstained_after,
        "abstained_baseline": abstained_baseline,
        "questions": len(test), "target_layers": list(sets.target_layers),
        "neurons_per_layer": {name: list(sizes[name]) for name in ("relevant_exclusive", "irrelevant_exclusive")},
        "deactivated_per_layer": [row["deactivated_neurons"] for row in summary["layers"]],
        "trainable_params": summary["total"]["trainable"],
        "baseline_trainable_params": trainable_summary(baseline_model, print_table=False)["total"]["trainable"],
        "training_loss": {"neuro-rit": losses, "baseline": baseline_losses},
        "seconds": meter.seconds, "peak_memory_mib": meter.peak_mib, "export": exported,
        "predictions_after": {c: predictions[c][:5] for c in CONDITIONS},
        "settings": asdict(settings),
    }
    write_report(report, out)
    return report
