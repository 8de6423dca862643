"""fastrit.tune under torchrun, as users run it on several devices (here gloo, two processes on the CPU): the
processes train in step, because DistributedDataParallel synchronises their gradients (each sees other examples,
so without it their weights would part), and `fastrit tune`'s report and export come from process 0 alone."""

import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

import fastrit
from fastrit import data, demo

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TUNE = dict(max_steps=2, batch_size=2, optimizer="adamw", learning_rate=1e-3, warmup=0, save_steps=1,
            progress=False)

# each process tunes the reader with the same call, then writes its own trained tensors
SCRIPT = textwrap.dedent("""
    import os, sys
    import fastrit
    from fastrit import data, demo

    mined, train, out = sys.argv[1:4]
    model, tokenizer = demo.load_model()
    fastrit.tune(model, tokenizer, data.load(train), fastrit.NeuronSets.load(mined), output_dir=out, **{settings})
    fastrit.save_delta(model, os.path.join(out, f"rank{{os.environ['RANK']}}.safetensors"))
""")


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_processes_train_in_step_and_report_once(tmp_path):
    model, tokenizer = demo.load_model()
    mined = tmp_path / "mined"
    fastrit.mine(model, tokenizer, demo.load_data("train"), max_examples=4, steps=2, progress=False).save(mined)
    train = data.RagData(demo.load_data("train").records.select(range(16))).save(tmp_path / "train.jsonl")
    script = tmp_path / "tune.py"
    script.write_text(SCRIPT.format(settings=repr(TUNE)))
    out = tmp_path / "tuned"
    _torchrun(str(script), str(mined), str(train), str(out))

    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    trained = [name for name in ranks[0] if name.startswith("param.")]
    assert trained and ranks[0].keys() == ranks[1].keys()
    for name in trained:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    untrained = fastrit.prepare(demo.load_model()[0], fastrit.NeuronSets.load(mined))
    assert all(not torch.equal(ranks[0][name], untrained.get_parameter(name[len("param."):])) for name in trained)
    assert (out / "2-distill" / "delta.safetensors").is_file()

    cli = _torchrun("-m", "fastrit", "tune", "--neuron-sets", str(mined), "--data", str(train), "--out",
                    str(tmp_path / "cli"), "--max-steps", "denoise=1,distill=1", "--batch-size", "2", "--optimizer",
                    "adamw", "--no-progress", "--device", "cpu", "--export", str(tmp_path / "export"))
    assert cli.stdout.count("exported to") == 1
    assert (tmp_path / "export" / "config.json").is_file()
