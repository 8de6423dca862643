"""`fastrit mine` as users run it, in other processes: killed with SIGKILL and started again, killed during the
final write, and shared over two processes with torchrun (gloo). Each must end with NeuronSets equal, bit for
bit, to one uninterrupted run in this process."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import pytest
import torch
from safetensors import safe_open

import fastrit
from fastrit import demo
from fastrit.mining import CHUNK_RECORDS, NeuronSets

datasets.disable_progress_bars()

RECORDS = CHUNK_RECORDS * 5
STEPS = 8
ARGS = ["mine", "--max-examples", str(RECORDS), "--steps", str(STEPS), "--no-progress", "--device", "cpu"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Runs the CLI with NeuronSets' safetensors writer replaced by one that writes half of the file under its
# temporary name and then kills the process: SIGKILL in the middle of the final write.
DIE_IN_FINAL_WRITE = textwrap.dedent("""
    import os, signal, sys
    import fastrit.mining.sets as sets_module

    def half_write_then_die(tensors, path, metadata=None):
        sets_module.save_file.__wrapped__(tensors, path, metadata=metadata)
        with open(path, "r+b") as written:
            written.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    half_write_then_die.__wrapped__ = sets_module.save_file
    sets_module.save_file = half_write_then_die
    from fastrit.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def uninterrupted():
    model, tokenizer = demo.load_model()
    return fastrit.mine(model, tokenizer, demo.load_data("train"), max_examples=RECORDS, steps=STEPS,
                        progress=False)


def _cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastrit", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


def _summed_chunks(out) -> int:
    total = out / "total.safetensors"
    if not total.is_file():
        return 0
    try:
        with safe_open(str(total), framework="pt") as handle:
            return json.loads(handle.metadata()["stats"])["prefix"]
    except Exception:  # being replaced right now
        return 0


def test_sigkill_mid_run_and_during_the_final_write_then_resume(uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fastrit", *ARGS, "--out", str(out)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _summed_chunks(out) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = _summed_chunks(out)
    assert 1 <= done < RECORDS // CHUNK_RECORDS and not (out / "neuron_sets.safetensors").exists()

    resumed = _cli(*ARGS, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert NeuronSets.load(out) == uninterrupted

    # killed half-way through writing the result of another selection: the folder keeps the complete result
    # of the run before, and the same command finishes the new one
    killed = subprocess.run([sys.executable, "-c", DIE_IN_FINAL_WRITE, *ARGS, "--share", "0.1", "--out", str(out)],
                            env=ENV, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert list(out.glob(".neuron_sets.safetensors.*.tmp"))  # the half-written file is under its temporary name
    assert NeuronSets.load(out) == uninterrupted
    again = _cli(*ARGS, "--share", "0.1", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert NeuronSets.load(out) == uninterrupted.select(share=0.1)
    assert not list(out.rglob(".*.tmp"))


def test_torchrun_two_processes_equal_one(uninterrupted, tmp_path):
    out = tmp_path / "sharded"
    # torchrun gives each process OMP_NUM_THREADS=1 unless it is set; a CPU matmul split over another number of
    # threads rounds differently in the last bits (seen on an AVX-512 Xeon), so each process gets the threads
    # the uninterrupted run in this process had: the sharding, not the thread count, is what is compared.
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastrit", *ARGS, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert NeuronSets.load(out) == uninterrupted
    assert run.stdout.count("target layers") == 1  # process 0 reports
