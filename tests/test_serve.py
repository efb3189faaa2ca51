"""`calm serve` end to end: a live server on a free loopback port, driven by the official openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
from helpers import calm_command, run_calm

MODEL = "tests/fixtures/official-tiny/calm"
NAME = "calm"  # the fixture folder's name, which the server uses as the model id
OK = {"length", "stop"}
SLOW = {"ignore_eos": True, "temperature": 0.5, "samples": 3200}  # lasts seconds: the most one row gets by default (16 x 200)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("CALM_API_KEY", None)
    proc = subprocess.Popen(
        calm_command() + ["serve", "-m", MODEL, "--port", str(port), "--device", "cpu", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    with server("--max-batch", "4") as (base, _):
        yield base


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def test_models_and_health(live: str) -> None:
    assert [m.id for m in client(live).models.list()] == [NAME]
    health = httpx.get(f"{live}/health").json()
    assert health["status"] == "ok" and health["threads"] >= 1 and health["threads_reason"]


def test_completion_plain_and_streamed_agree(live: str) -> None:
    c = client(live)
    plain = c.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, seed=7, temperature=0.5)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 12
    assert plain.usage.prompt_tokens > 0 and plain.usage.total_tokens == plain.usage.prompt_tokens + 12
    chunks = list(c.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=12, seed=7, temperature=0.5, stream=True,
        stream_options={"include_usage": True},
    ))
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1
    text_chunks = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].text for ch in text_chunks) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in text_chunks][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_plain_and_streamed(live: str) -> None:
    c = client(live)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    plain = c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, seed=3)
    assert plain.choices[0].message.role == "assistant" and plain.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, seed=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert len({ch.id for ch in chunks}) == 1


def test_stop_string_cuts_the_text_and_its_tokens_are_not_counted(live: str) -> None:
    c = client(live)
    same = {"model": NAME, "prompt": "Once", "max_tokens": 40, "seed": 5, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    full = c.completions.create(**same)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and stop.strip()
    cut = c.completions.create(**same, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]
    assert cut.usage.completion_tokens < full.usage.completion_tokens


def test_n_choices_differ_and_each_is_reproducible(live: str) -> None:
    c = client(live)
    many = c.completions.create(model=NAME, prompt="The", max_tokens=16, seed=11, temperature=1.0, n=3)
    texts = [choice.text for choice in sorted(many.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) == 3
    second = c.completions.create(model=NAME, prompt="The", max_tokens=16, seed=12, temperature=1.0)
    assert second.choices[0].text == texts[1]  # choice i uses seed + i


def test_streamed_choices_and_echo(live: str) -> None:
    c = client(live)
    args = {"model": NAME, "prompt": "Echo me", "max_tokens": 8, "seed": 21, "temperature": 1.0, "n": 2, "echo": True}
    plain = c.completions.create(**args)
    streamed: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list] = {0: [], 1: []}
    for chunk in c.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            finishes[choice.index].append(choice.finish_reason)
    assert {ch.index: ch.text for ch in plain.choices} == streamed
    assert all(text.startswith("Echo me") for text in streamed.values())
    assert all(f[-1] in OK and not any(f[:-1]) for f in finishes.values())


def test_seeded_request_is_the_same_beside_concurrent_ones(live: str) -> None:
    c = client(live)

    def ask(seed: int) -> str:
        return c.completions.create(model=NAME, prompt=f"Story {seed % 3}:", max_tokens=24, seed=seed, temperature=0.7).choices[0].text

    alone = {seed: ask(seed) for seed in range(9)}
    with ThreadPoolExecutor(9) as pool:
        together = dict(zip(range(9), pool.map(ask, range(9))))
    assert together == alone  # the same text under load, and no request got another's output
    assert len(set(alone.values())) > 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": NAME, "prompt": "x", "temperature": 2}, "temperature"),
        ({"model": NAME, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": NAME, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": NAME, "prompt": "x", "n": 1000}, "n"),
        ({"model": NAME, "prompt": "x", "logprobs": 3}, "logprobs"),
        ({"model": NAME}, "prompt"),
        ({"model": NAME, "prompt": "word " * 12000}, "prompt"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(live: str, body: dict, param: str) -> None:
    r = httpx.post(f"{live}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_invalid_json_unknown_model_and_the_server_keeps_serving(live: str) -> None:
    r = httpx.post(f"{live}/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError):
        client(live).completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="last message"):
        client(live).chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "hi"}], max_tokens=2)
    assert client(live).completions.create(model=NAME, prompt="still", max_tokens=4).choices[0].finish_reason in OK


def test_metrics_count_requests_and_tokens(live: str) -> None:
    done = client(live).completions.create(model=NAME, prompt="count me", max_tokens=8, seed=1)
    text = httpx.get(f"{live}/metrics").text
    assert "calm_requests_total" in text and "calm_queue_depth" in text and "calm_step_seconds_bucket" in text
    tokens = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("calm_completion_tokens_total")]
    assert tokens and tokens[0] >= done.usage.completion_tokens > 0


def test_api_key_is_required_when_set() -> None:
    with server("--api-key", "s3cret") as (base, _):
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert client(base, "s3cret").completions.create(model=NAME, prompt="hi", max_tokens=4).choices[0].finish_reason in OK
        assert httpx.get(f"{base}/health").status_code == 200


def test_full_queue_is_429_and_a_dropped_stream_frees_its_slot() -> None:
    with server("--max-batch", "1", "--max-queue", "0") as (base, proc):
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                          json={"model": NAME, "prompt": "Go on", "max_tokens": 100000, "stream": True, **SLOW}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with pytest.raises(openai.RateLimitError):
                client(base).completions.create(model=NAME, prompt="x", max_tokens=2)
        deadline = time.time() + 10
        while httpx.get(f"{base}/health").json()["active"] and time.time() < deadline:
            time.sleep(0.05)
        assert client(base).completions.create(model=NAME, prompt="x", max_tokens=4).choices[0].finish_reason in OK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log = proc.stderr.read()
        assert "Traceback" not in log and "cmpl-" in log and "finish=length" in log, log
        assert "chosen once at start" in log.splitlines()[0], log


def test_sigint_ends_a_stream_in_flight_and_exits_0() -> None:
    with server() as (base, proc):
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "Talk"}], "max_tokens": 100000, "stream": True,
            **SLOW,
        }) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            started = time.time()
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data:")]
        assert proc.wait(timeout=10) == 0 and time.time() - started < 8
        finals = [json.loads(line[5:]) for line in rest if line != "data: [DONE]"]
        assert finals and finals[-1]["choices"][0]["finish_reason"] == "abort"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
                st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "seed", "stop", "n", "stream", "samples", "sampler",
          "stream_options", "logprobs", "echo", "ignore_eos"]


@settings(max_examples=int(os.environ.get("CALM_FUZZ_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(["completions", "chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=6), valid_model=st.booleans())
def test_fuzzed_bodies_get_an_answer_never_a_server_error(live: str, endpoint: str, body: dict, valid_model: bool) -> None:
    if valid_model:
        body["model"] = NAME
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # keep each case short; the type checks still run
    body["stream"] = False
    r = httpx.post(f"{live}/v1/{endpoint}", content=json.dumps(body, allow_nan=True), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 429), r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_a_busy_port_is_one_error_line_before_any_banner() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_calm("serve", "-m", "tests/fixtures/official-tiny/calm", "--port", str(port), "--device", "cpu", timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], r.stderr
