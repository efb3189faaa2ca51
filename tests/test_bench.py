"""`calm bench` end to end, the baseline engine's cache parity, and compiled against eager decoding."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import decode_all, run_calm

from calm_cli.bench.run import PRESETS, BenchOptions, check_options, preset_configs
from calm_cli.errors import UsageError
from calm_cli.io.checkpoint import save_baseline
from calm_cli.io.tokenizer import load_tokenizer
from calm_cli.models.baseline import TokenTransformer
from calm_cli.models.calm import CALM
from calm_cli.models.config import CALMConfig
from calm_cli.runtime.engine import Engine
from calm_cli.runtime.settings import GenerationSettings

NUMBERS = (
    "prefill_tok_s", "decode_tok_s", "vector_steps_s", "ttft_ms", "step_ms_p50", "step_ms_p95", "peak_mem_mb", "bandwidth_gbs"
)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_json_on_tiny_preset():
    r = run_calm(
        "bench", "--preset", "tiny", "--K", "2,4", "-b", "1,2", "-p", "8", "-n", "8", "-r", "2",
        "--threads", "1", "--device", "cpu", "--json", "--peak-gbs", "20",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = report["rows"]
    assert sorted((row["kind"], row["K"], row["batch"]) for row in rows) == [
        ("baseline", 1, 1), ("baseline", 1, 2), ("calm", 2, 1), ("calm", 2, 2), ("calm", 4, 1), ("calm", 4, 2)
    ]
    for row in rows:
        assert all(_positive(row[key]) for key in NUMBERS), row
        assert 0 < row["bandwidth_frac"] < 10 and row["new_tokens"] == 8 and row["prompt_tokens"] == 8
        assert row["decode_tok_s"] == pytest.approx(row["vector_steps_s"] * row["batch"] * row["K"], rel=1e-3)
        if row["kind"] == "calm":
            assert _positive(row["speedup_vs_baseline"])
    assert report["peak_mem_kind"].startswith("rss_high_water") and all(m["load_s"] >= 0 for m in report["models"])
    assert report["threads"] == 1 and report["threads_reason"] == "--threads"


def test_bench_markdown_and_usage_errors():
    r = run_calm("bench", "--preset", "tiny", "-p", "4", "-n", "8", "-r", "1", "--threads", "1", "--device", "cpu", "--md")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("| kind | K | batch |") and "| calm | 4 | 1 |" in r.stdout and "1 thread (--threads) · " in r.stdout
    for args in (["--K", "x"], ["--preset", "huge"]):
        bad = run_calm("bench", *args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, (args, bad.stderr)
    for options in (BenchOptions(new_tokens=4), BenchOptions(temperatures=[2.0]), BenchOptions(batches=[0])):
        with pytest.raises(UsageError):
            check_options(options)


def _tiny_baseline(eos: int | None = None) -> TokenTransformer:
    torch.manual_seed(0)
    config = CALMConfig(vocab_size=512, patch_size=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos, pad_token_id=2)
    return TokenTransformer(config).eval().requires_grad_(False)


def test_token_engine_greedy_equals_full_forward_argmax():
    model = _tiny_baseline()
    prompts = [[5, 9, 33, 7, 100, 21], [40, 2, 17]]  # different lengths share a step
    outputs = decode_all(Engine(model, max_batch=2), prompts, GenerationSettings(max_tokens=12, temperature=0.0, seed=1))
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, outputs):
            assert len(tokens) == 12
            seq = list(prompt)
            for token in tokens:
                assert model(torch.tensor([seq]))[0, -1].argmax().item() == token
                seq.append(token)


def test_generate_with_a_baseline_directory(tmp_path, fixtures):
    model = _tiny_baseline()
    model.tokenizer = load_tokenizer(fixtures / "tokenizer.json")
    save_baseline(model, tmp_path / "baseline")
    r = run_calm(
        "generate", "Hello there", "-m", str(tmp_path / "baseline"), "-n", "6", "--temp", "0", "--device", "cpu", "--json"
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["completion_tokens"] == 6 and report["steps"] == 6 and report["finish_reason"] == "length"


@pytest.mark.parametrize("device", [
    pytest.param("cuda", marks=pytest.mark.cuda),
    pytest.param("cpu", marks=pytest.mark.skipif(
        not os.environ.get("CALM_TEST_COMPILE"),
        reason="compiling the tiny model takes minutes on 2 CPU cores (inductor builds C++); runs with CALM_TEST_COMPILE=1",
    )),
])
def test_compiled_decode_gives_the_eager_tokens(device: str):
    """Inductor's kernels give the eager tokens at T = 1 and 0.5 (float32 model: the T = 0.5 pools take the bf16 path)."""
    device = torch.device(device)
    torch.manual_seed(0)
    with device:
        model = CALM(*preset_configs(PRESETS["tiny"], 4)).eval().requires_grad_(False)
    prompts = torch.randint(0, model.config.vocab_size, (2, 16)).tolist()
    for temperature in (1.0, 0.5):
        settings = GenerationSettings(max_tokens=24, temperature=temperature, num_samples=32, seed=3)
        eager = decode_all(Engine(model, max_batch=2), prompts, settings)
        compiled = decode_all(Engine(model, max_batch=2, compile=True), prompts, settings)
        assert compiled == eager
