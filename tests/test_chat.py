"""`calm chat` in a real pseudo-terminal (pexpect), and scripted through pipes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pexpect
import pytest
from helpers import calm_command, run_calm

MODEL = "tests/fixtures/official-tiny/calm"
PROMPT = ">>>"  # prompt-toolkit draws ">>>" and then moves the cursor past the space
# A fresh prompt on a new line (prompt-toolkit redraws ">>> text" in place as keys are typed).
NEW_PROMPT = re.compile(r"\n(?:\x1b\[[0-9;?]*[A-Za-z])*>>>")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The end of the accepted input line, any escape sequences, then the first visible character of the reply.
REPLY_STARTS = re.compile(r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*[^\x1b\s]")
CONTROL = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, fixtures):
    monkeypatch.chdir(fixtures.parent.parent.parent)


@pytest.fixture
def chat(tmp_path):
    """Start `calm chat` in a pseudo-terminal and wait for its first prompt."""
    children: list[pexpect.spawn] = []

    def start(*args: str) -> pexpect.spawn:
        env = {
            **os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "TERM": "xterm-256color", "NO_COLOR": "1",
            "PROMPT_TOOLKIT_NO_CPR": "1",  # nobody answers cursor-position requests in a test
        }
        command = calm_command()
        child = pexpect.spawn(
            command[0], command[1:] + ["chat", "-m", MODEL, *args], env=env, encoding="utf-8", dimensions=(40, 200), timeout=90,
        )
        children.append(child)
        child.expect(PROMPT)
        return child

    yield start
    for child in children:
        child.close(force=True)


def ask(child: pexpect.spawn, line: str) -> str:
    """Send a line; return what the terminal showed until the next prompt, escape sequences removed."""
    child.sendline(line)
    child.expect(NEW_PROMPT)
    return ESCAPE.sub("", child.before).replace("\r\n", "\n")


def leave(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_turns_commands_save_history_and_ctrl_d(chat, tmp_path):
    child = chat("-n", "12", "--temp", "1", "--seed", "1", "--verbose")
    first_screen = ask(child, "Hello there")
    assert "vector-steps/s" in first_screen
    assert "temperature 0.5" in ask(child, "/temp 0.5")
    assert "tokens/s" in ask(child, "How are you?")
    assert "saved 2 turns" in ask(child, f"/save {tmp_path / 'two.json'}")
    assert "new conversation" in ask(child, "/reset")
    assert "saved 0 turns" in ask(child, f"/save {tmp_path / 'none.json'}")
    child.sendcontrol("d")
    assert leave(child) == 0

    saved = json.loads((tmp_path / "two.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["Hello there", "How are you?"]
    assert all(t["assistant"] for t in saved["turns"])
    assert saved["settings"]["temperature"] == 0.5 and saved["template"] == "User: {message}\nAssistant:"
    assert saved["turns"][0]["assistant"].translate(CONTROL) in first_screen.translate(CONTROL)
    assert json.loads((tmp_path / "none.json").read_text())["turns"] == []
    history = (tmp_path / "data" / "calm" / "chat_history").read_text()
    assert "+Hello there" in history and "+How are you?" in history and "+/temp 0.5" in history


def test_ctrl_c_stops_the_reply_and_ctrl_c_on_empty_prompt_leaves(chat, tmp_path):
    # Many samples per step make each step slow, and --max-tokens beyond the context keeps the reply going.
    child = chat("-n", "4000", "--temp", "0.5", "--samples", "2000", "--seed", "3")
    child.sendline("Tell me a long story")
    child.expect(REPLY_STARTS)
    child.sendintr()
    child.expect(r"\(interrupted\)")
    child.expect(NEW_PROMPT)
    assert "saved 1 turns" in ask(child, f"/save {tmp_path / 'cut.json'}")
    child.sendcontrol("c")
    assert leave(child) == 0
    turn = json.loads((tmp_path / "cut.json").read_text())["turns"][0]
    assert turn["user"] == "Tell me a long story" and 0 < len(turn["assistant"]) < 4000


def test_multiline_input_help_and_unknown_command(chat, tmp_path):
    child = chat("-n", "4", "--temp", "1", "--seed", "2", "--no-history")
    child.send("first line\x1b\r")  # Esc-Enter: a newline inside the message
    ask(child, "second line")
    child.sendline('"""')
    child.expect(r"\.\.\.")
    child.sendline("block one")
    child.expect(r"\.\.\.")
    ask(child, 'block two"""')
    assert "/max-tokens" in ask(child, "/help") and "Esc-Enter" in child.before
    assert "did you mean /temp?" in ask(child, "/tmep 1")
    assert "/temp must be in [0, 1]" in ask(child, "/temp 7")
    ask(child, f"/save {tmp_path / 'multi.json'}")
    child.sendline("/exit")
    assert leave(child) == 0
    users = [t["user"] for t in json.loads((tmp_path / "multi.json").read_text())["turns"]]
    assert users == ["first line\nsecond line", "block one\nblock two"]
    assert not (tmp_path / "data").exists()


def test_scripted_chat_one_reply_per_line(tmp_path):
    script = f'Hello\n\n/temp 0.7\n"""two\nlines"""\n/seed 5\nThird turn\n/save {tmp_path / "s.json"}\n'
    r = run_calm("chat", "-m", MODEL, "-n", "12", "--temp", "1", "--seed", "1", input=script)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n")
    assert len(replies) == 4 and replies[-1] == "" and "\x1b" not in r.stdout and ">>>" not in r.stdout
    assert "temperature 0.7" in r.stderr and "seed 5" in r.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["Hello", "two\nlines", "Third turn"]
    assert saved["settings"]["seed"] == 5


def test_oldest_turns_dropped_to_fit_context_and_too_long_message(tmp_path):
    long = "word " * 130  # about 400 tokens; the fixture's context is 1024
    script = f"{long}\n{long}\n{long}\n{'word ' * 1200}\nshort\n/save {tmp_path / 'c.json'}\n"
    r = run_calm("chat", "-m", MODEL, "-n", "8", "--temp", "1", "--seed", "1", input=script)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 4
    assert "dropped the 1 oldest turn" in r.stderr and "1024-token context" in r.stderr
    assert "error: the message is" in r.stderr
    assert len(json.loads((tmp_path / "c.json").read_text())["turns"]) == 4


def test_load_continues_a_saved_conversation(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    args = ("chat", "-m", MODEL, "-n", "8", "--temp", "1", "--seed", "1")
    template = ("--template", "Q: {message}\\nA:")  # as typed in a shell: backslash-n means a newline
    assert run_calm(*args, *template, "--system", "Be brief.", input=f"One\nTwo\n/save {first}\n").returncode == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"turns": 3}')
    r = run_calm(*args, input=f"/load {bad}\n/load {tmp_path / 'missing.json'}\n/load {first}\nThree\n/save {second}\n")
    assert r.returncode == 0, r.stderr
    assert "not a transcript" in r.stderr and "No such file" in r.stderr and "loaded 2 turns" in r.stderr
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["template"] == "Q: {message}\nA:" and b["template"] == "User: {message}\nAssistant:"
    assert b["system"] == "Be brief." and b["turns"][:2] == a["turns"] and b["turns"][2]["user"] == "Three"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--template", "no slot"], "{message}"),
        (["-m", "/no/such/dir"], "no such model directory"),
    ],
)
def test_bad_chat_flags_are_one_line_usage_errors(args, needle):
    r = run_calm("chat", *(["-m", MODEL] if "-m" not in args else []), *args, input="hi\n")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_scripted_chat_into_closed_pipe_is_quiet():
    proc = subprocess.run(
        " ".join(calm_command()) + f" chat -m {MODEL} -n 400 --temp 1 | head -c 10",
        shell=True, input=b"hello\nagain\n", capture_output=True, timeout=120,
    )
    assert proc.returncode == 0 and len(proc.stdout) == 10 and proc.stderr == b""


def test_history_path_follows_xdg(monkeypatch, tmp_path):
    from calm_cli.cli.chat import history_path

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert history_path() == tmp_path / "calm" / "chat_history"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert history_path() == Path.home() / ".local" / "share" / "calm" / "chat_history"


def test_template_renders_the_conversation_and_its_stop_string():
    from calm_cli.runtime.chat import Conversation, Template, Turn

    template = Template.parse("User: {message}\\nAssistant:")
    assert template.stop == "\nUser:"
    talk = Conversation(template, "Be kind.", [Turn("Hi", "Hello!"), Turn("Bye", "See you.")])
    assert talk.prompt("Why?") == "Be kind.\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant: See you.\nUser: Why?\nAssistant:"
    assert talk.fit("Why?", len, budget=60) == 1 and talk.prompt("Why?").startswith("Be kind.\nUser: Bye")
    assert Template.parse("### Q:\n{message}\n### A:\n").answered("x", "y") == "### Q:\nx\n### A:\ny\n"


def test_out_of_range_seed_is_one_line_and_the_chat_goes_on(tmp_path):
    big = str(2**70)
    script = f"/seed {big}\n/seed -3\n/seed {2**63 - 1}\nHello\nAgain\n/save {tmp_path / 's.json'}\n"
    r = run_calm("chat", "-m", MODEL, "-n", "8", "--temp", "1", input=script)
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("/seed N" in line for line in errors) and "Traceback" not in r.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["settings"]["seed"] == 2**63 - 1 and len(saved["turns"]) == 2


def test_out_of_range_seed_flag_is_a_usage_error():
    r = run_calm("chat", "-m", MODEL, "--seed", str(2**63), input="hi\n")
    assert r.returncode == 2 and "--seed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
def test_banner_tab_completion_cut_mark_and_setters_alone(chat, tmp_path):
    child = chat("-n", "4", "--temp", "1", "--seed", "1")
    banner = ESCAPE.sub("", child.before)
    assert "calm · K=4 · context" in banner and "fixtures" not in banner  # the name, not the whole path
    child.send("/te\t")
    child.expect("/temp")
    assert "temperature 1" in ask(child, "")  # Tab completed "/temp"; alone, it shows the value
    assert "[… cut at 4 tokens" in ask(child, "Hello there")
    transcript = tmp_path / "t.json"
    ask(child, f"/save {transcript}")
    shown = ask(child, f"/load {transcript}")
    assert "loaded 1 turns" in shown and "you:   Hello there" in shown
    child.sendcontrol("d")
    assert leave(child) == 0
