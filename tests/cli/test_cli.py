"""The command line: every subcommand's help, runs on the embedded default with no required argument, and user
errors as one line with a non-zero exit (a traceback with --debug)."""

import re
import subprocess
import sys

import pytest
import torch

from fastrit import NeuronAttribution, NeuronSets
from fastrit.cli import build_parser, main

SUBCOMMANDS = ("attribute", "mine", "plot", "prepare", "tune", "eval", "export", "plan", "bench", "demo")


def test_help_lists_the_subcommands_and_every_argument_documents_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in subparsers.choices.items():
        for action in parser._actions:
            assert action.help, f"fastrit {name} {action.option_strings or action.dest}: no help"


def test_python_m_and_console_script_agree():
    for command in ([sys.executable, "-m", "fastrit", "--help"], [sys.executable.replace("python", "fastrit"),
                                                                  "--help"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "attribute" in run.stdout and "mine" in run.stdout


def test_attribute_one_prompt_and_a_data_file(tmp_path, capsys):
    out = tmp_path / "one.safetensors"
    prompt = "Passage: Varnok. The capital of Varnok is Tesh.\nQuestion: What is the capital of Varnok?\nAnswer:"
    assert main(["attribute", "--prompt", prompt, "--answer", "Tesh", "--steps", "3", "--out", str(out),
                 "--no-progress", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("layer") >= 3 and str(out) in printed
    one = NeuronAttribution.load(out)
    assert one.scores.shape == (1, 3, 512) and one.settings["steps"] == 3
    assert main(["attribute", "--max-examples", "2", "--steps", "3", "--out", str(tmp_path / "two.safetensors"),
                 "--no-progress"]) == 0
    assert NeuronAttribution.load(tmp_path / "two.safetensors").scores.shape == (2, 3, 512)


def test_attribute_and_mine_take_auto_steps(tmp_path, capsys):
    out = tmp_path / "auto.safetensors"
    prompt = "Passage: Varnok. The capital of Varnok is Tesh.\nQuestion: What is the capital of Varnok?\nAnswer:"
    assert main(["attribute", "--prompt", prompt, "--answer", "Tesh", "--steps", "auto", "--delta-tol", "0.01",
                 "--out", str(out), "--no-progress", "--top", "2"]) == 0
    assert "steps " in capsys.readouterr().out
    result = NeuronAttribution.load(out)
    assert result.settings["steps"] == "auto" and result.settings["delta_tol"] == 0.01
    assert result.settings["method"] == "gausslegendre" and result.steps_used.shape == (1, 3)
    mined = tmp_path / "mined"
    assert main(["mine", "--out", str(mined), "--max-examples", "2", "--steps", "auto", "--no-progress"]) == 0
    assert NeuronSets.load(mined).settings["steps"] == "auto"
    with pytest.raises(SystemExit):
        main(["attribute", "--prompt", prompt, "--answer", "Tesh", "--steps", "some", "--out", str(out)])
    assert "--steps" in capsys.readouterr().err


def test_mine_and_plot_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "mined"
    assert main(["mine", "--out", str(out), "--max-examples", "8", "--steps", "2", "--no-progress"]) == 0
    assert "target layers" in capsys.readouterr().out
    sets = NeuronSets.load(out)
    assert sets.examples == {"relevant": 8, "irrelevant": 8}
    assert (out / "neurons_per_layer.png").is_file() and (out / "activation_shares.png").is_file()
    assert main(["plot", str(out), "--out", str(tmp_path / "pictures" / "run.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == [
        "run-activation_shares.png", "run-neurons_per_layer.png"]


def test_bench_runs_a_benchmark_of_the_checkout_with_its_options(tmp_path, capfd):
    assert main(["bench", "tune", "--help"]) == 0  # the benchmark's own options, in a process of its own
    assert "--dev-records" in capfd.readouterr().out
    assert main(["bench", "all", "--quick"]) == 1
    assert "'all' runs every benchmark with its defaults" in capfd.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["mine", "--data", "{tmp}/missing.jsonl"], "no such file"),
    (["mine", "--model", "{tmp}/no-model"], "no such model folder"),
    (["mine", "--out", "{tmp}/a-file/out"], "--out: cannot create"),
    (["mine", "--out", "{tmp}/a-file"], "--out: .* not a folder"),
    (["mine", "--share", "2"], "share"),
    (["mine", "--device", "cuda:0"] if not torch.cuda.is_available() else ["mine", "--k", "0"], "--device|k"),
    (["attribute", "--prompt", "x"], "--prompt and --answer"),
    (["plot", "{tmp}/nothing"], "no neuron_sets"),
])
def test_user_errors_are_one_line_and_a_non_zero_exit(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    if argv[0] == "mine":
        argv += ["--out", str(tmp_path / "out")] if "--out" not in argv else []
        argv += ["--max-examples", "2", "--steps", "2", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastrit {argv[0]}: error:"), err
    assert re.search(message, err[0]), err
    with pytest.raises((OSError, ValueError)):
        main(["--debug", *argv])
