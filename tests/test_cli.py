"""The real `calm` entry point, in subprocesses: output, JSON reports and one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch
from helpers import calm_command, run_calm
from safetensors.torch import load_file
from tokenizers import Tokenizer

from calm_cli.io.checkpoint import load_autoencoder

MODEL = "tests/fixtures/official-tiny/calm"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, fixtures):
    monkeypatch.chdir(fixtures.parent.parent.parent)


def test_generate_json_report():
    r = run_calm("generate", "Hello world, this is", "-m", MODEL, "-n", "16", "--temp", "1", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["completion_tokens"] == 16 and report["steps"] == 4
    assert report["finish_reason"] == "length" and report["tokens_per_s"] > 0
    assert r.stderr == ""


def test_generate_seed_repeatable_and_stdin():
    a = run_calm("generate", "-", "-m", MODEL, "-n", "12", "--temp", "1", "--seed", "7", input="Once upon")
    b = run_calm("generate", "-m", MODEL, "-n", "12", "--temp", "1", "--seed", "7", input="Once upon")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_echo_prints_prompt_first():
    r = run_calm("generate", "The cat", "-m", MODEL, "-n", "8", "--temp", "1", "--seed", "1", "--echo")
    assert r.returncode == 0 and r.stdout.startswith("The cat")


def test_short_prompt_and_empty_prompt_work():
    for prompt in ("a", ""):
        r = run_calm("generate", prompt, "-m", MODEL, "-n", "8", "--temp", "1", "--seed", "1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["completion_tokens"] == 8


def test_info_json():
    r = run_calm("info", MODEL, "--json")
    facts = json.loads(r.stdout)
    assert facts["patch_size (K)"] == 4 and facts["parameters"]["total"] > 0 and facts["file format"] == "safetensors"


def test_encode_decode_roundtrip(tmp_path, fixtures):
    text = "The quick brown fox jumps over the lazy dog."
    out = tmp_path / "z.safetensors"
    r = run_calm("encode", text, "-m", MODEL, "--out", str(out))
    assert r.returncode == 0, r.stderr
    tokenizer = Tokenizer.from_file(str(fixtures / "calm" / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    tensors = load_file(str(out))
    assert tensors["input_ids"].tolist() == ids + [2] * (-len(ids) % 4)  # no BOS; PAD (id 2) fills the last chunk
    assert tensors["mean"].shape == (math.ceil(len(ids) / 4), 16)
    lines = run_calm("encode", text, "-m", MODEL).stdout.splitlines()
    assert len(lines) == tensors["mean"].shape[0]
    assert [json.loads(line)["text_tokens"] for line in lines] == [4] * (len(ids) // 4) + [len(ids) % 4] * (len(ids) % 4 > 0)
    assert torch.allclose(torch.tensor(json.loads(lines[0])["mean"]), tensors["mean"][0], atol=1e-6)
    decoded_file = run_calm("decode", str(out), "-m", MODEL)
    decoded_lines = run_calm("decode", "-", "-m", MODEL, input="\n".join(lines))
    assert decoded_file.returncode == 0 and decoded_lines.returncode == 0
    assert decoded_file.stdout == decoded_lines.stdout and decoded_file.stdout.strip()

    ae = load_autoencoder(fixtures / "calm")
    padded = torch.tensor([ids + [2] * (-len(ids) % 4)])
    with torch.inference_mode():
        recon = ae.decode(ae.encode(padded)[0]).argmax(-1).flatten()[: len(ids)]
    correct = int((recon == torch.tensor(ids)).sum())
    rt = json.loads(run_calm("encode", "--roundtrip", text, "-m", MODEL).stdout)
    assert rt == {"tokens": len(ids), "correct": correct, "accuracy": correct / len(ids)}


def test_bundled_autoencoder_gives_the_text_back(tmp_path):
    """`calm encode "ab" | calm decode -` printed "-ab": BOS came back as a character."""
    lines = run_calm("encode", "ab")
    assert lines.returncode == 0 and "warning" not in lines.stderr, lines.stderr
    assert run_calm("decode", "-", input=lines.stdout).stdout == "ab\n"
    out = tmp_path / "z.safetensors"
    assert run_calm("encode", "Hi.", "--out", str(out)).returncode == 0
    assert run_calm("decode", str(out)).stdout == "Hi.\n"


def test_convert_then_generate_same_output(tmp_path):
    dst = tmp_path / "converted"
    assert run_calm("convert", "tests/fixtures/official-tiny/calm-bin", str(dst)).returncode == 0
    args = ["generate", "Some text here", "-n", "12", "--temp", "1", "--seed", "5"]
    assert run_calm(*args, "-m", str(dst)).stdout == run_calm(*args, "-m", MODEL).stdout


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["generate", "x", "-m", "/no/such/dir"], 2, "no such model directory"),
        (["generate", "x", "-m", MODEL, "--temp", "1.5"], 2, "--temp"),
        (["generate", "x", "-m", MODEL, "--temp", "-0.1"], 2, "--temp"),
        (["generate", "x", "-m", MODEL, "--max-tokens", "0"], 2, "--max-tokens"),
        (["generate", "x", "-m", MODEL, "--sampler", "magic"], 2, "--sampler"),
        (["generate", "x", "-m", MODEL, "--dtype", "int3"], 2, "dtype"),
        (["generate", "x", "-m", MODEL, "--max-tokens", "lots"], 2, "--max-tokens"),
        (["generate", "x", "-m", MODEL, "--samples", str(2**63)], 2, "--samples"),
        (["generate", "x", "-m", "tests/fixtures/official-tiny/autoencoder"], 1, "autoencoder"),
        (["decode", "/no/file.safetensors", "-m", MODEL], 2, "no such file"),
        (["frobnicate"], 2, "frobnicate"),
    ],
)
def test_errors_are_one_line(args, code, needle):
    r = run_calm(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "command,seed",
    [
        (["generate", "x", "-m", MODEL], "99999999999999999999"),
        (["generate", "x", "-m", MODEL], str(2**63)),
        (["generate", "x", "-m", MODEL], "-1"),
        (["bench"], "99999999999999999999"),
        (["eval", MODEL, "-m", MODEL], str(2**63)),
        (["train", "calm", ".", "-o", "/nonexistent/out"], "-1"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else v[:6],
)
def test_seed_out_of_range_is_a_usage_error(command, seed):
    r = run_calm(*command, "--seed", seed)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--seed" in lines[0] and "Traceback" not in r.stderr


def test_largest_seed_is_accepted():
    r = run_calm("generate", "x", "-m", MODEL, "-n", "4", "--temp", "1", "--seed", str(2**63 - 1))
    assert r.returncode == 0, r.stderr


def test_corrupt_checkpoint_is_runtime_error(tmp_path, fixtures):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(fixtures / "calm", d)
    (d / "model.safetensors").chmod(0o644)
    (d / "model.safetensors").write_bytes(b"garbage")
    r = run_calm("generate", "x", "-m", str(d))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "safetensors" in r.stderr


def test_prompt_longer_than_context_is_a_usage_error():
    r = run_calm("generate", "word " * 1200, "-m", MODEL, "-n", "4")
    assert r.returncode == 2 and "context" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback():
    r = run_calm("--debug", "generate", "x", "-m", "/no/such/dir")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_closed_pipe_is_quiet():
    proc = subprocess.run(
        " ".join(calm_command()) + f" generate 'Hello there' -m {MODEL} -n 400 --temp 1 | head -c 20; exit ${{PIPESTATUS[0]}}",
        shell=True, capture_output=True, timeout=120, executable="/bin/bash",
    )
    assert proc.returncode == 0 and len(proc.stdout) == 20
    assert b"Traceback" not in proc.stderr and b"Error" not in proc.stderr


def test_encode_warns_when_the_latents_lose_text():
    """The bundled autoencoder knows English text; a lossy round trip says so and where, and still exits 0."""
    text = "naïve café — 東京 🙂"
    lines = run_calm("encode", text)
    assert lines.returncode == 0, lines.stderr
    warning = [line for line in lines.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "of 21 tokens" in warning[0] and "first lost: 'ï'" in warning[0], lines.stderr
    assert run_calm("decode", "-", input=lines.stdout).stdout != text + "\n"


def test_an_empty_pipe_is_no_prompt_but_an_explicit_empty_one_is():
    r = run_calm("generate", "-n", "4", "-m", MODEL)  # run_calm pipes an empty stdin
    assert r.returncode == 2 and r.stderr.strip() == "error: no prompt: stdin was empty (give PROMPT, or '' for none)"
    assert run_calm("generate", "-", "-n", "4", "-m", MODEL).returncode == 2
    r = run_calm("generate", "", "-n", "4", "--seed", "1", "-m", MODEL)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_ctrl_c_during_generate_leaves_the_shell_its_own_line():
    """In a terminal, Ctrl-C mid-stream: the bytes after the echoed ^C end the line, exit 130, no traceback."""
    import pexpect

    command = calm_command()
    child = pexpect.spawn(command[0], command[1:] + ["generate", "The history of", "-n", "4000", "--seed", "1"],
                          env={**os.environ, "NO_COLOR": "1"}, timeout=90)
    child.expect(rb"(\S+\s+){12}")  # streaming has begun
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and b"Traceback" not in child.before
    assert child.before.endswith(b"\r\n"), child.before[-60:]


def test_jsonl_echoes_an_id_with_a_lone_surrogate_without_losing_the_batch():
    lines = '{"prompt": "Hi", "id": "\\ud800", "max_tokens": 4}\n{"prompt": "Yo", "id": 2, "max_tokens": 4}\n'
    r = run_calm("generate", "--jsonl", "--seed", "1", "-m", MODEL, input=lines)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["id"] for rec in records] == ["\ud800", 2] and all(rec["completion_tokens"] == 4 for rec in records)
