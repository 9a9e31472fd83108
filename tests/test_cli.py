"""The `visiontune` command in fresh processes: train, predict, evaluate, split, errors, cache."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli


def run_fresh(*args: str) -> subprocess.CompletedProcess:
    return run(*args, fresh=True)


def run(*args: str, cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`visiontune ARGS`: in this process (conftest.run_cli) unless the test needs a fresh one or another cwd."""
    if not fresh and cwd is None:
        return run_cli(*args)
    return subprocess.run(
        [sys.executable, "-m", "visiontune.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=600,
    )


@pytest.fixture
def trained_run(class_folders, tmp_path) -> Path:
    result = run("train", str(class_folders), "--out", str(tmp_path / "run"), "--img-size", "64", "--epochs", "6")
    assert result.returncode == 0, result.stderr
    assert "validation accuracy" in result.stdout and "classifier" in result.stderr  # outcome on stdout, messages on stderr
    # stderr is a pipe here, not a terminal: plain lines, one per epoch with an ETA, no runs of blank lines
    assert "\n\n" not in result.stderr
    assert len(re.findall(r"epoch +\d+/6 +train_loss [0-9.]+ +valid_loss [0-9.]+ +valid_accuracy [0-9.]+ .* eta \d+:\d\d", result.stderr)) == 6
    assert re.search(r"predicted time \d+:\d\d from the start", result.stderr)
    assert re.search(r"time since start: predicted [0-9.]+s, actual [0-9.]+s", result.stderr)
    assert "Warning" not in result.stderr  # library warnings are not shown to users
    assert re.search(r"^weights_sha256: [0-9a-f]{64}$", (tmp_path / "run" / "config.yaml").read_text(), re.M)
    return tmp_path / "run"


def test_train_predict_evaluate_in_fresh_processes(trained_run, class_folders, tmp_path):
    out_csv = tmp_path / "pred.csv"
    result = run_fresh("predict", str(trained_run), str(class_folders / "red"), "--csv", str(out_csv))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 12 and sum(r["label"] == "red" for r in rows) >= 10
    assert rows[0]["topk"].count(":") == 3

    table = run_fresh("predict", str(trained_run / "classifier"), str(class_folders / "blue" / "blue_000.png"))
    assert table.returncode == 0 and "blue_000.png" in table.stdout and "blue" in table.stdout
    deep = tmp_path / ("a folder with a long name " * 4).strip() / "and_a_long_file_name_that_must_stay_visible.png"
    deep.parent.mkdir()
    deep.write_bytes((class_folders / "blue" / "blue_000.png").read_bytes())
    piped = run_fresh("predict", str(trained_run), str(deep.parent))  # stdout is a pipe: whole paths, tab-separated
    assert piped.stdout.splitlines()[0] == "image\tclass\tprob\tnext"
    assert piped.stdout.splitlines()[1].split("\t")[0] == str(deep)

    evaluation = run_fresh("evaluate", str(trained_run), str(class_folders), "--json", str(tmp_path / "m.json"))
    assert evaluation.returncode == 0, evaluation.stderr
    for text in ("accuracy", "precision", "recall", "confusion matrix"):
        assert text in evaluation.stdout


def test_predict_reports_unreadable_images(trained_run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    result = run("predict", str(trained_run), str(bad))
    assert result.returncode == 1 and "skipped" in result.stderr and "bad.jpg" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "{tmp}/missing"], "no such folder"),
        (["evaluate", "{tmp}", "{tmp}"], "not a visiontune classifier"),
        (["predict", "{tmp}", "{tmp}"], "not a visiontune classifier"),
        (["train", "{tmp}", "--arch", "nope_net"], "unknown architecture"),
        (["train", "{tmp}", "--budget", "soon"], "cannot read the duration"),
    ],
)
def test_errors_are_one_actionable_line(tmp_path, args, message):
    result = run(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr


def test_split_and_cache_commands(class_folders, tmp_path):
    result = run("split", str(class_folders), str(tmp_path / "split"), "--valid", "0.25")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "split" / "valid").rglob("*.png"))) == 9
    info = run("cache", "info", "--cache-dir", str(tmp_path / "c"))
    assert info.returncode == 0


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["predict", "--help"], ["train", "/no/such/folder"],
                                  ["predict", "/", "x.png"], ["trian"]])
def test_help_and_argument_errors_answer_without_loading_torch(args):
    """`--help`, a mistyped path or command must answer in well under a second: torch never loads."""
    code = ("import sys\nfrom visiontune.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stderr
    if "--help" not in args:
        assert "error:" in result.stderr and "--help` lists the options" in result.stderr
        assert "usage:" not in result.stderr  # one message, not the whole option list


def test_every_command_help_has_examples_and_every_option_a_help_text():
    import argparse

    from visiontune.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert "examples:\n  visiontune" in (command.epilog or "") or "examples:\n  curl" in (command.epilog or ""), name
        for action in command._actions:
            assert action.help, f"visiontune {name} {action.option_strings or action.dest} has no help text"


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "visiontune", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip()


def test_ctrl_c_prints_the_command_that_continues_the_run(class_folders, tmp_path):
    import signal

    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "visiontune", "train", str(class_folders), "--out", str(out), "--img-size", "64",
         "--epochs", "20", "--no-report"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
        # a test runner started in the background (`make test &`) ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in process.stderr:  # wait for training to be under way, then press Ctrl-C
        seen.append(line)
        if re.search(r"epoch +3/20", line):
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, "".join(seen) + rest
    assert f"visiontune train --resume {out}" in rest.replace("\n", " ")

    again = run("train", str(class_folders), "--out", str(out))
    assert again.returncode == 2 and "interrupted run" in again.stderr
    assert f"visiontune train --resume {out}" in again.stderr.replace("\n", " ")
    resumed = run("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    finished = run("train", str(class_folders), "--out", str(out))
    assert finished.returncode == 2 and "finished run" in finished.stderr


def test_shared_options_are_declared_once_with_one_vocabulary():
    """--out, --batch-size, --img-size, --engine and --labels are each declared by one helper in cli.py, and every
    command that offers --engine offers the same choices (one engine vocabulary) with the same default."""
    import argparse
    import re
    from pathlib import Path

    from visiontune import cli
    from visiontune.names import ENGINE_CHOICES, INFERENCE_BATCH

    source = Path(cli.__file__).read_text()
    for flag in ("--out", "--batch-size", "--img-size", "--engine", "--labels", "--tta"):
        assert len(re.findall(rf'add_argument\("{flag}"', source)) == 1, flag
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    engines = {name: next(a for a in sub._actions if "--engine" in a.option_strings) for name, sub in commands.items()
               if any("--engine" in a.option_strings for a in sub._actions)}
    assert {"predict", "evaluate", "ensemble", "hard-examples", "cache"} <= set(engines)
    assert all(tuple(a.choices) == ENGINE_CHOICES for a in engines.values())
    assert {name: a.default for name, a in engines.items() if a.default != "auto"} == {"train": None}  # the plan decides
    batches = [next(a for a in sub._actions if "--batch-size" in a.option_strings) for name, sub in commands.items()
               if name != "train" and any("--batch-size" in a.option_strings for a in sub._actions)]
    assert len(batches) == 4 and {a.default for a in batches} == {INFERENCE_BATCH}


def test_each_command_calls_one_api_function_and_writes_no_file():
    """A command parses, calls ONE api function, prints (docs/architecture.md). Commands that dispatch (show
    --gradcam / --feature-maps, cache info / clear / build) call one per branch: no two api calls may run on
    the same path (a call in a block that contains, or is, another call's block). And no command opens a
    file for writing itself."""
    import ast
    from pathlib import Path

    from visiontune import cli

    tree = ast.parse(Path(cli.__file__).read_text())
    problems = []
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")):
        paths: list[tuple] = []

        def visit(node, path):
            for field in ("body", "orelse", "handlers", "finalbody"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    here = path + ((id(node), field),)
                    for child in block:
                        visit(child, here)
                        if (isinstance(child, ast.If) and not child.orelse
                                and isinstance(child.body[-1], (ast.Return, ast.Raise))):
                            here = here + (("after", id(child)),)  # what follows runs only when the if did not
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Call) and ast.unparse(child.func).startswith("api."):
                    paths.append((path, ast.unparse(child.func)))
                if not isinstance(child, ast.stmt):
                    visit(child, path)

        visit(func, ())
        for a, (path_a, name_a) in enumerate(paths):
            for path_b, name_b in paths[a + 1:]:
                if path_a[: len(path_b)] == path_b or path_b[: len(path_a)] == path_a:
                    problems.append(f"{func.name}: {name_a} and {name_b} on one path")
        writes = [ast.unparse(n) for n in ast.walk(func) if isinstance(n, ast.Call)
                  and ast.unparse(n.func).endswith(("write_text", "write_bytes", "write_text_whole", "written_whole"))]
        problems += [f"{func.name} writes a file: {w}" for w in writes]
    assert not problems, "\n".join(problems)
