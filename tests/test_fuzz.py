"""Fuzzing the command line: whatever the arguments, JSON lines, model files or stdin, `calm` ends
with exit 0, or with one `error: ...` line on stderr and exit 1 or 2: never a traceback, never a hang.

Runs in-process through `calm_cli.cli.main.main` (a subprocess per case would cost seconds).
CALM_FUZZ_EXAMPLES sets the examples per test (default 25, for CI).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from calm_cli import load_model, save_model
from calm_cli.cli import main as cli_main
from calm_cli.cli.common import STATE

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny" / "calm"
EXAMPLES = int(os.environ.get("CALM_FUZZ_EXAMPLES", "25"))
CASE_SECONDS = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(BaseException):
    """A case ran past CASE_SECONDS (a BaseException, so the CLI's own error handling cannot swallow it)."""


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run(args: list[str], stdin: bytes = b"") -> Outcome:
    """`calm ARGS` in this process, stdin fed from bytes; stdout and stderr captured."""
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["calm", *args]
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    sys.stdout, sys.stderr = out, err
    STATE["debug"] = False

    def hang(signum, frame):
        raise Hang(f"calm {' '.join(args)} ran past {CASE_SECONDS}s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        cli_main.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_clean(outcome: Outcome, args: list[str]) -> None:
    """Exit 0, or exit 1 or 2 with exactly one `error: ...` line on stderr; no traceback either way.

    `generate --jsonl` reports a bad line as a JSON object with "error" on stdout and exits 1
    with nothing on stderr; that is clean too.
    """
    assert "Traceback" not in outcome.err, (args, outcome.err)
    if outcome.code == 0:
        return
    if "--jsonl" in args and outcome.code == 1 and not outcome.err.strip():
        rows = [json.loads(line) for line in outcome.out.splitlines()]
        assert rows and any("error" in row for row in rows), (args, outcome.out)
        return
    lines = outcome.err.strip().splitlines()
    assert outcome.code in (1, 2), (args, outcome.code, outcome.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, outcome.err)
    # Stricter than the rule: an exception the code did not anticipate is reported as "(run with --debug ...)";
    # only running out of memory (a request for 2^31 samples) may end that way.
    unexpected = "(run with --debug" in lines[0] and "allocate" not in lines[0]
    assert not unexpected, ("an unexpected exception reached the top", args, outcome.err)


# ---- values ----------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 3000),
    st.sampled_from([2**31, 2**63, 2**64, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
).map(str)
WORDS = st.one_of(
    st.sampled_from(["", "-", "--", "auto", "cpu", "cuda", "cuda:7", "fp32", "bf16", "int3", "approx", "exact", "fast", "dense", "nan", "1e999"]),
    st.text(max_size=12).filter(lambda s: "\x00" not in s),
)
VALUES = st.one_of(NUMBERS, WORDS)
PATHS = st.sampled_from(["/no/such/dir", "/", "/dev/null", "/etc/hostname", "tests", str(FIXTURE / "config.json"), str(FIXTURE)])

GENERATE_FLAGS = ["--max-tokens", "--temp", "--samples", "--sampler", "--candidate-decoder", "--seed", "--device", "--dtype", "--stop",
                  "--system", "--candidate-dtype", "--max-batch", "--threads"]


@pytest.mark.parametrize("temp", ["1e-20", "5e-324", "1e-7"])
def test_tiny_temperature(temp):
    args = ["generate", "x", "-m", str(FIXTURE), "-n", "1", "--temp", temp, "--seed", "1"]
    assert_clean(run(args), args)


@st.composite
def generate_args(draw) -> list[str]:
    """`generate PROMPT -m FIXTURE` plus a few flags with arbitrary values, and at most 8 new tokens unless fuzzed."""
    args = ["generate", draw(st.text(max_size=40).filter(lambda s: "\x00" not in s)), "-m", str(FIXTURE)]
    flags = draw(st.lists(st.sampled_from(GENERATE_FLAGS), max_size=3, unique=True))
    if "--max-tokens" not in flags:
        args += ["-n", "8"]
    for flag in flags:
        args += [flag, draw(VALUES)]
    if draw(st.booleans()):
        args.append("--json")
    return args


@given(args=generate_args())
@FUZZ
def test_generate_flags(args):
    assert_clean(run(args), args)


@given(
    command=st.sampled_from(["encode", "decode", "info", "convert"]),
    values=st.lists(st.one_of(VALUES, PATHS), min_size=0, max_size=3),
    flag=st.sampled_from([None, "--model", "--tokenizer", "--out", "--dtype", "--ae", "--roundtrip", "--json", "--force"]),
    data=st.data(),
)
@FUZZ
def test_model_command_arguments(command, values, flag, data, tmp_path):
    args = [command, *values]
    if command == "convert" and len(values) >= 2:
        args[2] = str(tmp_path / "converted")  # never write into a real folder
    if command == "info" and not values:
        args.append(str(FIXTURE))
    if command in ("encode", "decode") and flag != "--model":
        args += ["-m", str(FIXTURE)]
    if flag in ("--roundtrip", "--json", "--force"):
        args.append(flag)
    elif flag is not None:
        args += [flag, str(tmp_path / "out.safetensors") if flag == "--out" else data.draw(st.one_of(VALUES, PATHS))]
    assert_clean(run(args), args)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
JSONL_KEYS = ["prompt", "temp", "max_tokens", "seed", "samples", "id"]


@st.composite
def jsonl_lines(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["object", "any", "bytes"]))
        if kind == "object":
            obj = {key: draw(JSON_VALUES) for key in draw(st.lists(st.sampled_from(JSONL_KEYS), max_size=4, unique=True))}
            if "max_tokens" not in obj:
                obj["max_tokens"] = 4
            lines.append(json.dumps(obj).encode())
        elif kind == "any":
            lines.append(json.dumps(draw(JSON_VALUES)).encode())
        else:
            lines.append(draw(st.binary(max_size=30)).replace(b"\n", b" "))
    return b"\n".join(lines) + b"\n"


@given(stdin=jsonl_lines())
@example(stdin=b'{"prompt": "Yo", "samples": 4611686018427387904}\n{"prompt": "a", "max_tokens": 2}\n')
@FUZZ
def test_generate_jsonl_lines(stdin):
    args = ["generate", "--jsonl", "-m", str(FIXTURE), "-n", "4"]
    outcome = run(args, stdin)
    assert_clean(outcome, args)
    rows = [json.loads(line) for line in outcome.out.splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    assert (outcome.code == 1) == any("error" in row for row in rows)


@given(
    command=st.sampled_from([["generate", "-m", str(FIXTURE), "-n", "4"], ["encode", "-m", str(FIXTURE)], ["decode", "-m", str(FIXTURE)],
                             ["generate", "--jsonl", "-m", str(FIXTURE), "-n", "4"], ["chat", "-m", str(FIXTURE), "-n", "4"]]),
    stdin=st.binary(max_size=200),
)
@FUZZ
def test_random_bytes_on_stdin(command, stdin):
    assert_clean(run(command, stdin), command)


# ---- corrupted model folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def our_model() -> Path:
    """The fixture in calm's own layout (config, weights with the autoencoder, tokenizer), written once."""
    folder = Path(tempfile.mkdtemp(prefix="calm-fuzz-"))
    save_model(load_model(FIXTURE), folder / "model")
    yield folder / "model"
    shutil.rmtree(folder)


def _mutate_config(config: dict[str, Any], draw) -> dict[str, Any]:
    """Delete one field of config.json (or of its ae_config), or set it to an arbitrary JSON value."""
    section = config["ae_config"] if draw(st.booleans()) else config
    key = draw(st.sampled_from(sorted(section)))
    if draw(st.integers(0, 4)) == 0:
        del section[key]
    else:
        section[key] = draw(st.one_of(
            JSON_VALUES, st.integers(-3, 1000), st.sampled_from([2**31, 2**63, 10**30, math.nan, math.inf, -1.0]),
        ))
    return config


def _corrupt(folder: Path, name: str, how: str, data) -> None:
    path = folder / name
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "flip":
        at = data.draw(st.lists(st.integers(0, min(len(raw) - 1, 20000)), min_size=1, max_size=8))
        buffer = bytearray(raw)
        for i in at:
            buffer[i] = data.draw(st.integers(0, 255))
        path.write_bytes(bytes(buffer))
    elif how == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=300)))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        config = _mutate_config(json.loads(raw), data.draw)
        path.write_text(json.dumps(config))


@given(
    name=st.sampled_from(["config.json", "model.safetensors", "tokenizer.json"]),
    command=st.sampled_from(["info", "generate", "encode", "convert"]),
    data=st.data(),
)
@FUZZ
def test_corrupted_model_files(our_model, name, command, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("case")
    folder = work / "model"
    shutil.copytree(our_model, folder)
    kinds = ["truncate", "flip", "garbage", "empty"] + (["fields", "fields", "fields"] if name == "config.json" else [])
    _corrupt(folder, name, data.draw(st.sampled_from(kinds)), data)
    args = {
        "info": ["info", str(folder)],
        "generate": ["generate", "Hello", "-m", str(folder), "-n", "4", "--seed", "1"],
        "encode": ["encode", "Hello there", "-m", str(folder)],
        "convert": ["convert", str(folder), str(work / "out")],
    }[command]
    assert_clean(run(args), args)
    shutil.rmtree(work)
