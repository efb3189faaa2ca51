"""The first five minutes (issue 17): names, fast help, suggestions, exit codes, help text, threads, convert and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_calm

from calm_cli.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "official-tiny" / "calm"


def _commands() -> list[tuple[list[str], object]]:
    """Every leaf command as (words after `calm`, click command), walking the groups."""
    import typer

    found = []

    def walk(words: list[str], command: object) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(words + [name], sub)
        else:
            found.append((words, command))

    walk([], typer.main.get_command(app))
    return found


COMMANDS = _commands()
MODEL_COMMANDS = [words for words, cmd in COMMANDS if any("--model" in p.opts for p in cmd.params)]


def test_the_walk_finds_every_command():
    names = {" ".join(w) for w, _ in COMMANDS}
    assert {"generate", "chat", "models", "info", "encode", "decode", "convert", "bench", "eval"} <= names
    assert {"data prepare", "train calm", "tokenizer train"} <= names
    assert set(map(tuple, MODEL_COMMANDS)) >= {("generate",), ("chat",), ("info",), ("encode",), ("decode",), ("bench",), ("eval",)}


def test_help_version_and_usage_errors_do_not_import_torch():
    """One interpreter runs every help page, --version and usage errors (bad flags and bad values), then reports whether torch was imported."""
    bad_values = [["generate", "x", "--temp", "2"], ["generate", "x", "-m", "nosuch"], ["serve", "--port", "0"],
                  ["generate", "x", "--candidate-dtype", "fp16"], ["info", "-m", "nosuch"], ["chat", "--temp", "5"]]
    argvs = [["--help"], ["--version"], ["gen", "x"], ["generate", "--bogus"], *bad_values] + [w + ["--help"] for w, _ in COMMANDS]
    script = (
        "import sys, io, contextlib\n"
        "from calm_cli.cli.main import main\n"
        f"for argv in {argvs!r}:\n"
        "    sys.argv = ['calm', *argv]\n"
        "    out = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):\n"
        "            main()\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, 2), (argv, exc.code)\n"
        "    sys.stdout = sys.__stdout__\n"
        "print('torch' in sys.modules, 'calm_cli.runtime.engine' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("words", [[], ["train"], ["data"]])
def test_a_group_alone_prints_its_help(words):
    r = run_calm(*words)
    assert r.returncode == 0 and r.stdout.startswith("Usage: calm") and "Commands:" in r.stdout and r.stderr == ""


def test_version():
    r = run_calm("--version")
    assert r.returncode == 0 and r.stdout.startswith("calm ") and r.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("typed,meant", [("gen", "generate"), ("genrate", "generate"), ("modles", "models")])
def test_unknown_command_suggests(typed, meant):
    r = run_calm(typed, "x")
    assert r.returncode == 2 and f"Did you mean '{meant}'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_after_the_command_keeps_the_exit_code():
    r = run_calm("info", "-m", "/no/such/dir", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("words", MODEL_COMMANDS, ids=" ".join)
def test_same_mistake_same_exit_code(words, tmp_path):
    """A missing model directory, a directory without config.json and an unknown name are all exit 2, one line."""
    args = {"generate": ["x"], "eval": [str(tmp_path / "d.txt")], "encode": ["x"], "decode": ["-"]}.get(words[0], [])
    (tmp_path / "d.txt").write_text("Some text.\n")
    (tmp_path / "empty").mkdir()
    for model, needle in ((str(tmp_path / "nope"), "no such model directory"), (str(tmp_path / "empty"), "no config.json"),
                          ("no-such-name", "known names")):
        r = run_calm(*words, *args, "-m", model)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (words, model, r.stderr)


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=" ".join)
def test_unknown_option_is_exit_2_everywhere(words):
    r = run_calm(*words, "--no-such-option")
    assert r.returncode == 2 and "no-such-option" in r.stderr and "Traceback" not in r.stderr


def test_calm_model_variable_is_named_in_its_error():
    r = run_calm("generate", "Hi", env={"CALM_MODEL": "/nope"})
    assert r.returncode == 2 and r.stderr.strip() == "error: CALM_MODEL=/nope: no such model directory"


def test_names_resolve_from_another_directory(tmp_path):
    env = {"CALM_HOME": str(tmp_path / "home")}
    listed = [json.loads(line) for line in subprocess.run(
        [sys.executable, "-m", "calm_cli", "models", "--json"], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env},
    ).stdout.splitlines()]
    by_name = {m["name"]: m for m in listed}
    assert by_name["default"]["kind"] == "calm" and by_name["baseline"]["kind"] == "baseline" and by_name["baseline"]["K"] == 1
    assert all(Path(m["path"]).is_dir() and m["size_mb"] > 1 for m in listed)
    r = subprocess.run([sys.executable, "-m", "calm_cli", "info", "-m", "baseline", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["kind"].startswith("baseline")
    script = "import calm_cli; m = calm_cli.load_model(); print(type(m).__name__, m.config.patch_size == by_k)"
    r = subprocess.run([sys.executable, "-c", script.replace("by_k", str(by_name["default"]["K"]))], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.split() == ["CALM", "True"], r.stderr


def test_user_models_directory_answers_to_names(tmp_path):
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    shutil.copytree(TINY, models / "tiny")
    env = {"CALM_HOME": str(tmp_path / "home")}
    table = run_calm("models", env=env)
    assert table.returncode == 0 and any(line.split()[0] == "tiny" for line in table.stdout.splitlines()[1:])
    r = run_calm("generate", "Hello", "-m", "tiny", "-n", "8", "--temp", "1", "--seed", "1", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["completion_tokens"] == 8


def test_help_fits_80_columns_has_examples_and_no_type_on_flags():
    for words, _ in COMMANDS:
        r = run_calm(*words, "--help", env={"COLUMNS": "80"})
        assert r.returncode == 0, words
        lines = r.stdout.splitlines()
        assert max(map(len, lines)) <= 80, (words, max(lines, key=len))
        assert "<bool>" not in r.stdout and "Examples:" in r.stdout, words


def test_install_completion(tmp_path):
    # With shell detection off (as in a non-interactive run) the shell is named; users just type --install-completion.
    r = run_calm("--install-completion", "bash", env={"HOME": str(tmp_path), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0, r.stderr
    script = (tmp_path / ".bash_completions" / "calm.sh").read_text()
    assert "_CALM_COMPLETE" in script
    done = subprocess.run(
        [sys.executable, "-m", "calm_cli"], capture_output=True, text=True,
        env={**os.environ, "_CALM_COMPLETE": "complete_bash", "COMP_WORDS": "calm generate --thr", "COMP_CWORD": "2"},
    )
    assert "--threads" in done.stdout.split()


def test_threads_option_and_variable(tmp_path):
    args = ["generate", "Hello", "-m", str(TINY), "-n", "4", "--temp", "1", "--seed", "1"]
    assert run_calm(*args, "--threads", "2").returncode == 0
    bad = run_calm(*args, "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr
    env_bad = run_calm(*args, env={"CALM_THREADS": "many"})
    assert env_bad.returncode == 2 and "CALM_THREADS" in env_bad.stderr


def test_info_is_a_clean_table():
    r = run_calm("info", "-m", "default", env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    assert "ae_config" not in r.stdout and "autoencoder config" in r.stdout
    total = next(line for line in r.stdout.splitlines() if line.strip().startswith("total"))
    count = total.split()[1]
    assert "," in count and int(count.replace(",", "")) > 1_000_000 and float(total.split()[2]) > 1
    path_line = next(line for line in r.stdout.splitlines() if line.startswith("path"))
    assert Path(path_line.split(None, 1)[1]).is_dir()  # on one line, however narrow the terminal
    assert run_calm("info", "default", "-m", "default").returncode == 2


def test_convert_keeps_the_source_dtype_and_says_when_it_replaces(tmp_path):
    dst = tmp_path / "copy"
    first = run_calm("convert", "baseline", str(dst))
    assert first.returncode == 0 and "wrote" in first.stderr and "bfloat16" in first.stderr
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = (dst / "model.safetensors").stat().st_size
    again = run_calm("convert", "baseline", str(dst), "--dtype", "fp32")
    assert again.returncode == 0 and "replaced" in again.stderr
    assert (dst / "model.safetensors").stat().st_size > 1.9 * size


def test_ctrl_c_ends_the_line_and_exits_130(tmp_path):
    """A command interrupted mid-line: main() adds the newline and exits 130."""
    script = (
        "import sys, typer\n"
        "import calm_cli.cli.main as m\n"
        "class Stub:\n"
        "    def main(self, **kw):\n"
        "        sys.stdout.write('partial text'); sys.stdout.flush()\n"
        "        raise KeyboardInterrupt\n"
        "typer.main.get_command = lambda app: Stub()\n"
        "m.main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stdout == "partial text\n" and r.stderr == ""
