"""A hostile client against the server in-process (starlette's TestClient), and the same rules in `calm generate --jsonl`.

No request may take the server down or cost more than its stated budget; bad text gets an
answer, never a 500; the event loop never tokenizes; every error has OpenAI's shape;
fields CALM cannot honour are refused by name.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient
from test_fuzz import FIXTURE, run

from calm_cli import load_model
from calm_cli.runtime import runners
from calm_cli.runtime.budget import EXACT_DRAWS, EXACT_FIRST_BLOCK, logit_elements, step_candidates
from calm_cli.runtime.engine import Engine
from calm_cli.runtime.sampling import temperature_sample
from calm_cli.runtime.settings import GenerationSettings
from calm_cli.serve.app import ServeConfig, create_app
from calm_cli.serve.worker import EngineWorker

NAME = "calm"
JSON = {"content-type": "application/json"}
HUGE = {"model": NAME, "prompt": "hi", "samples": 1048576, "max_tokens": 2, "temperature": 0.5}


class WatchedTokenizer:
    """The model's tokenizer, recording whether `encode_batch` ran with an event loop in its thread; it can hold it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.on_loop: list[bool] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        self.entered.set()
        self.release.wait(60)
        return self.tokenizer.encode_batch(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURE)


def serving(model, tokenizer: Any = None, **config: Any) -> tuple[TestClient, Engine]:
    engine = Engine(model, max_batch=4)
    app = create_app(EngineWorker(engine), tokenizer or model.tokenizer,
                     ServeConfig(NAME, GenerationSettings(max_tokens=8), **config))
    return TestClient(app), engine


@pytest.fixture(scope="module")
def watched(model) -> WatchedTokenizer:
    return WatchedTokenizer(model.tokenizer)


@pytest.fixture(scope="module")
def app(model, watched) -> Iterator[tuple[TestClient, Engine]]:
    client, engine = serving(model, watched)
    with client:
        yield client, engine


def post(client: TestClient, body: dict, endpoint: str = "completions", **kwargs: Any):
    return client.post(f"/v1/{endpoint}", content=json.dumps(body), headers=JSON, **kwargs)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- 1. every request's cost is known before it runs ------------------------------------------


def test_a_million_samples_is_refused_with_its_cost_and_the_limit_before_any_step(app) -> None:
    client, engine = app
    draws = engine.sampling.draws
    error = error_of(post(client, HUGE), 400)
    assert error["code"] == "request_too_costly" and error["param"] == "samples"
    assert "2,147,483,648 logits" in error["message"] and "6,553,600" in error["message"]  # 1 x 2^20 x K 4 x V 512
    assert engine.sampling.draws == draws and not engine.has_work()
    sixteen = post(client, {"model": NAME, "prompt": "x", "n": 16, "max_tokens": 1, "temperature": 0.5})
    assert sixteen.status_code == 200, sixteen.text  # the default budget: 16 rows at the default samples
    assert error_of(post(client, {**HUGE, "samples": 3201}), 400)["code"] == "request_too_costly"


def test_the_budget_counts_rows_and_is_configurable(model) -> None:
    per_row = logit_elements(1, 200, 4, 512)
    client, _ = serving(model, max_request_logits=3 * per_row)
    with client:
        ok = post(client, {"model": NAME, "prompt": "x", "n": 3, "samples": 200, "max_tokens": 4, "seed": 1})
        assert ok.status_code == 200, ok.text
        error = error_of(post(client, {"model": NAME, "prompt": "x", "n": 4, "samples": 200, "max_tokens": 4}), 400)
        assert error["code"] == "request_too_costly" and "4 rows x 200 candidates" in error["message"]
        error = error_of(post(client, {"model": NAME, "prompt": ["a", "b"], "n": 2}), 400)
        assert error["param"] == "n" and f"{3 * per_row:,}" in error["message"]
        assert post(client, {"model": NAME, "prompt": "x", "n": 16, "temperature": 1.0, "max_tokens": 2}).status_code == 200


def test_step_candidates_follow_the_samplers() -> None:
    assert step_candidates(1.0, 200, "approx") == 1 and step_candidates(1.0, 200, "exact") == 1
    assert step_candidates(0.5, 200, "approx") == 200 and step_candidates(0.0, 300, "exact") == 300
    assert step_candidates(0.001, 200, "exact") == 1000 and step_candidates(1e-5, 10, "exact") == EXACT_DRAWS
    assert EXACT_DRAWS == inspect.signature(temperature_sample).parameters["max_draws"].default
    assert EXACT_FIRST_BLOCK == runners.EXACT_BLOCK


def test_jsonl_refuses_a_costly_line_and_answers_the_others() -> None:
    stdin = b'{"prompt": "big", "samples": 1048576}\n{"prompt": "ok", "max_tokens": 2, "seed": 1}\n'
    outcome = run(["generate", "--jsonl", "-m", str(FIXTURE), "-n", "4"], stdin)
    rows = [json.loads(line) for line in outcome.out.splitlines()]
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert rows[0]["line"] == 1 and "6,553,600" in rows[0]["error"] and "--max-request-logits" in rows[0]["error"]
    assert rows[1]["line"] == 2 and rows[1]["completion_tokens"] == 2


# ---- 2. Unicode and bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(("endpoint", "body"), [
    ("completions", {"prompt": "a\ud800b", "stop": ["\udfff"]}),
    ("completions", {"prompt": ["ok", "\udc80"]}),
    ("completions", {"prompt": "nul \x00 inside"}),
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("chat/completions", {"messages": [{"role": "system", "content": [{"type": "text", "text": "\udbff"}]},
                                       {"role": "user", "content": "hi"}]}),
])
def test_lone_surrogates_and_nul_are_answered(app, endpoint: str, body: dict) -> None:
    response = post(app[0], {"model": NAME, "max_tokens": 4, "seed": 1, **body}, endpoint)
    assert response.status_code == 200, response.text


def test_a_body_that_is_not_utf8_is_a_400(app) -> None:
    response = app[0].post("/v1/completions", content=b'{"model": "calm", "prompt": "\xff\xfe"}', headers=JSON)
    assert error_of(response, 400)["code"] == "invalid_json"


def test_jsonl_bad_bytes_and_escaped_surrogates_cost_only_their_line() -> None:
    stdin = b'{"prompt": "\\ud800 x", "max_tokens": 2}\n{"prompt": "bad \xff\xfe", "id": 7}\n{"prompt": "fine", "max_tokens": 2}\n'
    # Seeded: an unseeded draw may end a line at EOS after one token.
    outcome = run(["generate", "--jsonl", "-m", str(FIXTURE), "-n", "4", "--seed", "0"], stdin)
    rows = [json.loads(line) for line in outcome.out.splitlines()]
    assert outcome.code == 1 and not outcome.err
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert rows[0]["completion_tokens"] == 2 and rows[2]["completion_tokens"] == 2
    assert rows[1] == {"error": "the line is not UTF-8 text (byte 0xff at column 17)", "line": 2, "id": 7}


def test_binary_stdin_is_one_usage_error() -> None:
    outcome = run(["generate", "-m", str(FIXTURE), "-n", "4"], b"abc\xff\xfe")
    assert outcome.code == 2 and outcome.err.strip() == "error: stdin is not UTF-8 text (byte 0xff at offset 3)"


# ---- 3. the event loop does no model work -----------------------------------------------------


def test_tokenizing_runs_off_the_event_loop(app, watched: WatchedTokenizer) -> None:
    watched.on_loop.clear()
    assert post(app[0], {"model": NAME, "prompt": "some text", "max_tokens": 2}).status_code == 200
    assert post(app[0], {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                "chat/completions").status_code == 200
    assert watched.on_loop == [False, False]


def test_health_answers_while_a_huge_prompt_is_tokenized(app, watched: WatchedTokenizer) -> None:
    client, _ = app
    watched.entered.clear()
    watched.release.clear()
    try:
        with ThreadPoolExecutor(2) as pool:
            big = pool.submit(post, client, {"model": NAME, "prompt": "word " * 600_000, "max_tokens": 2})
            assert watched.entered.wait(30)
            health = pool.submit(client.get, "/health")
            assert health.result(timeout=10).json()["status"] == "ok"  # while encode is still held
            watched.release.set()
            assert error_of(big.result(timeout=120), 400)["code"] == "context_length_exceeded"
    finally:
        watched.release.set()


def test_bodies_over_the_limit_are_413_before_parsing(model) -> None:
    client, _ = serving(model, max_body_bytes=1000)
    with client:
        error = error_of(post(client, {"model": NAME, "prompt": "x" * 2000}), 413)
        assert error["code"] == "body_too_large" and "1000 bytes" in error["message"]
        chunked = client.post("/v1/completions", content=iter([b'{"model": "calm", "prompt": "', b"x" * 2000, b'"}']), headers=JSON)
        assert error_of(chunked, 413)["code"] == "body_too_large"
        assert post(client, {"model": NAME, "prompt": "x", "max_tokens": 2}).status_code == 200


# ---- 4. honest answers ------------------------------------------------------------------------


def test_more_prompts_than_the_server_ever_takes_is_a_400_with_the_limit(app) -> None:
    error = error_of(post(app[0], {"model": NAME, "prompt": ["x"] * 100, "max_tokens": 2}), 400)
    assert error["code"] == "too_many_completions" and "at most 68" in error["message"]


def test_404_405_and_parse_errors_have_openais_shape(app) -> None:
    client, _ = app
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/completions"), 405)["code"] == "method_not_allowed"
    assert error_of(client.post("/v1/completions", content=b"{nope", headers=JSON), 400)["code"] == "invalid_json"
    assert error_of(client.post("/v1/completions", content=b"[1]", headers=JSON), 400)["code"] == "invalid_json"
    assert error_of(client.post("/v1/completions", content=b"x"), 400)["message"].startswith("the request body must be")


def test_the_key_is_checked_before_the_body(model) -> None:
    client, _ = serving(model, api_key="s3cret")
    with client:
        assert error_of(client.post("/v1/completions", content=b"{nope", headers=JSON), 401)["code"] == "invalid_api_key"
        big = client.post("/v1/completions", content=b"x" * (8 * 2**20), headers=JSON)
        assert error_of(big, 401)["type"] == "authentication_error"
        keyed = {**JSON, "authorization": "Bearer s3cret"}
        assert error_of(client.post("/v1/completions", content=b"{nope", headers=keyed), 400)["code"] == "invalid_json"
        assert client.get("/health").status_code == 200


# ---- 5. fields we cannot honour are refused ---------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("top_p", 0.9), ("presence_penalty", 0.5),
    ("frequency_penalty", -1), ("logit_bias", {"5": 10}), ("top_logprobs", 2),
])
def test_fields_calm_cannot_honour_are_refused_by_name(app, field: str, value: Any) -> None:
    for endpoint, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        error = error_of(post(app[0], {"model": NAME, field: value, **body}, endpoint), 400)
        assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]


def test_neutral_values_and_harmless_fields_are_accepted(app) -> None:
    body = {"model": NAME, "prompt": "x", "max_tokens": 2, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
            "response_format": {"type": "text"}, "tools": None, "logit_bias": {}, "user": "me", "metadata": {"a": "b"}}
    assert post(app[0], body).status_code == 200


def test_the_openai_client_works_unchanged(app) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app[0], max_retries=0)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=1)
    assert reply.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.completions.create(model=NAME, prompt="Hi", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4


# ---- 6. same seed, same text under load -------------------------------------------------------


def hidden_states_of(engine: Engine, prompts: list[list[int]], settings: list[GenerationSettings]) -> dict[int, list]:
    """Each request's (by seed) hidden state at every step, as the sampler got it, and its tokens at the end."""
    seen: dict[int, list] = {}
    sample = engine.runner.sample

    def watched(hidden, rng, s, stats, prefixes=None):
        for row, slot in enumerate(rng.index.tolist()):
            seen.setdefault(engine.slots[slot].seed, []).append(hidden[row].clone())
        return sample(hidden, rng, s, stats, prefixes)

    engine.runner.sample = watched
    requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
    for _ in engine.run():
        pass
    return {r.seed: (seen[r.seed], r.tokens) for r in requests}


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_a_seeded_request_gets_the_same_hidden_states_and_tokens_alone_and_beside_others(model, temperature: float) -> None:
    """Bitwise: the backbone step's rows are padded to ROW_QUANTUM, so no row's GEMM kernel depends on its neighbours."""
    words = ["Once upon a time", "The", "A long story about rivers and kings", "x", "Hello there, friend", "Go"]
    prompts = [model.tokenizer.encode(w).ids for w in words]
    settings = [GenerationSettings(max_tokens=40, temperature=temperature, seed=100 + i) for i in range(len(words))]
    together = hidden_states_of(Engine(model, max_batch=8), prompts, settings)
    for prompt, s in zip(prompts, settings):
        alone = hidden_states_of(Engine(model, max_batch=1), [prompt], [s])[s.seed]
        assert alone[1] == together[s.seed][1]
        assert len(alone[0]) == len(together[s.seed][0])
        assert all(bool((a == b).all()) for a, b in zip(alone[0], together[s.seed][0]))


# ---- fuzz: whatever the body, an answer in OpenAI's shape, never a server error ----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=6) | st.sampled_from(["\ud800", "a\udfffb", "\x00"])
BIG = st.sampled_from([1, 2, 16, 17, 3200, 3201, 2**20, 2**20 + 1, 2**31, 2**63])
FUZZED = {
    "prompt": TEXT | st.lists(TEXT, max_size=80), "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": TEXT | st.none()}), max_size=3),
    "samples": BIG, "n": BIG, "max_tokens": BIG, "temperature": st.sampled_from([0, 0.5, 1, 1.5]),
    "sampler": st.sampled_from(["approx", "exact"]), "stop": TEXT | st.lists(TEXT, max_size=5), "top_p": st.sampled_from([1, 0.5, None]),
    "tools": st.sampled_from([None, [], [{"type": "function"}]]), "user": TEXT, "seed": BIG, "unknown_field": TEXT,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(endpoint=st.sampled_from(["completions", "chat/completions"]),
       body=st.fixed_dictionaries({}, optional=FUZZED))
def test_fuzzed_bodies_with_surrogates_big_numbers_and_unknown_fields(app, endpoint: str, body: dict) -> None:
    body = {"model": NAME, **body}
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)  # keep each case short; the budget does not depend on it
    response = post(app[0], body, endpoint)
    assert response.status_code in (200, 400, 404, 429), response.text
    if response.status_code != 200:
        error_of(response, response.status_code)
