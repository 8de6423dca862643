"""The command line with ``--model`` a .gguf file: `python -m fastrit eval` runs on SmolLM2 (converted once into
fastrit's cache, which the child process shares), and a missing .gguf file is a one-line error naming --model."""

import json
import os
import subprocess
import sys

from fastrit.cli import main


def test_eval_runs_with_a_gguf_model(smollm2_conversion, tmp_path):
    out = tmp_path / "scores.json"
    # a gguf package that cannot be imported: the child must load the session's conversion from the cache
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "gguf.py").write_text("raise ImportError('the cache was not used')\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "stub"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "FASTRIT_CACHE": str(smollm2_conversion.cache), "PYTHONPATH": path}
    argv = ["eval", "--model", str(smollm2_conversion.gguf), "--max-examples", "3", "--k", "2", "--max-new-tokens",
            "3", "--batch-size", "3", "--no-progress", "--device", "cpu", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "fastrit", *argv], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
    assert json.loads(out.read_text())  # something was written


def test_a_missing_gguf_file_is_one_line_naming_model(tmp_path, capsys):
    missing = tmp_path / "nothing.gguf"
    assert main(["eval", "--model", str(missing), "--max-examples", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastrit eval: error: --model: no such .gguf file"), err
