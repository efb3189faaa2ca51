"""`calm generate` in shell pipelines: stdin with PROMPT, -f, --system, --jsonl, closed pipes, colour."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pexpect
import pytest
from helpers import calm_command, run_calm

MODEL = "tests/fixtures/official-tiny/calm"
FAST = ("-m", MODEL, "--temp", "1", "--seed", "1")
COLOUR = re.compile(r"\x1b\[[0-9;]*(?:3[0-9]|4[0-9]|9[0-7])(?:;[0-9;]*)?m")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, fixtures):
    monkeypatch.chdir(fixtures.parent.parent.parent)


def test_stdin_comes_before_the_prompt_argument():
    r = run_calm("generate", "Summary:", *FAST, "-n", "4", "--echo", input="Some notes.\nMore notes.\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Some notes.\nMore notes.\nSummary:")


def test_file_and_system_prompt(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("From the file.\n")
    r = run_calm("generate", "Question:", "-f", str(notes), "--system", "You are terse.", *FAST, "-n", "4", "--echo",
                 input="stdin is ignored with -f")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("You are terse.\nFrom the file.\nQuestion:") and "ignored" not in r.stdout


def test_jsonl_keeps_order_and_ids_and_exits_1_for_bad_lines(tmp_path):
    lines = [
        json.dumps({"prompt": "The first", "max_tokens": 8, "seed": 4, "id": "a"}),
        '{"prompt": "broken',
        json.dumps({"prompt": "The third", "max_tokens": 8, "seed": 4}),
        json.dumps({"prompt": 5, "id": "bad"}),
    ]
    r = run_calm("generate", "--jsonl", "-m", MODEL, "--temp", "1", input="\n".join(lines) + "\n")
    assert r.returncode == 1, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4] and out[0]["id"] == "a"
    assert "invalid JSON" in out[1]["error"] and "text" not in out[1] and "id" not in out[1]
    assert out[3]["id"] == "bad" and "prompt" in out[3]["error"]
    for o in (out[0], out[2]):
        assert o["completion_tokens"] == 8 and o["finish_reason"] == "length" and o["text"]
    # The same seed and prompt give the same text, alone or beside other requests.
    alone = run_calm("generate", "--jsonl", "-m", MODEL, "--temp", "1", input=lines[0] + "\n")
    assert alone.returncode == 0 and json.loads(alone.stdout)["text"] == out[0]["text"]


def test_jsonl_per_line_settings_and_validation(tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join([
        json.dumps({"prompt": "Long one", "max_tokens": 12}),
        json.dumps({"prompt": "Short one", "max_tokens": 4, "temp": 0.5, "samples": 20}),
        json.dumps({"prompt": "x", "temp": 3}),
        json.dumps({"prompt": "x", "max_token": 3}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"prompt": "word " * 1200}),
        json.dumps({"prompt": "Default settings"}),
    ]) + "\n")
    r = run_calm("generate", "--jsonl", "-f", str(requests), "-m", MODEL, "--temp", "1", "-n", "8", "--seed", "3")
    assert r.returncode == 1, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5, 7, 8]
    assert [o.get("completion_tokens") for o in out] == [12, 4, None, None, None, None, 8]
    assert '"temp" must be in [0, 1]' in out[2]["error"]
    assert 'unknown key "max_token"' in out[3]["error"]
    assert "string \"prompt\"" in out[4]["error"] and "context" in out[5]["error"]


@pytest.mark.parametrize(
    "args,needle",
    [(["--jsonl", "a prompt"], "--jsonl"), (["-f", "/no/such/notes.txt"], "notes.txt: No such file")],
)
def test_usage_errors_are_one_line(args, needle):
    r = run_calm("generate", *args, "-m", MODEL, input="{}\n")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1


def test_jsonl_into_closed_pipe_is_quiet():
    proc = subprocess.run(
        " ".join(calm_command() + ["generate", "--jsonl", "-m", MODEL, "--temp", "1", "-n", "8"]) + " | head -c 10",
        shell=True, input="".join(json.dumps({"prompt": "Hello", "seed": s}) + "\n" for s in range(4)).encode(),
        capture_output=True, timeout=120,
    )  # different seeds: four batches, so writes go on after head has gone
    assert proc.returncode == 0 and len(proc.stdout) == 10 and proc.stderr == b""


def test_no_ansi_in_pipes_even_without_no_color():
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env["TERM"] = "xterm-256color"
    for args, stdin in (
        (["generate", "Hi", *FAST, "-n", "8", "-v"], ""),
        (["chat", *FAST, "-n", "8", "-v"], "Hi\n/help\n/nonsense\n"),
    ):
        proc = subprocess.run(calm_command() + args, input=stdin, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout and proc.stderr and "\x1b" not in proc.stdout + proc.stderr


def test_no_color_in_a_terminal():
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm-256color"}
    env.pop("FORCE_COLOR", None)
    command = calm_command()
    child = pexpect.spawn(command[0], command[1:] + ["generate", "Hi", *FAST, "-n", "8", "-v"], env=env, encoding="utf-8", timeout=90)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "vector-steps/s" in child.before and not COLOUR.search(child.before)
