"""The candidate path's dtype: which one `auto` picks, the model left alone, and the certificate on bf16 states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm_cli.bench.run import PRESETS, preset_configs
from calm_cli.errors import UsageError
from calm_cli.models.calm import CALM
from calm_cli.runtime.fastdecode import FastCandidateDecoder
from calm_cli.runtime.precision import has_fast_bf16, resolve_candidate_dtype
from calm_cli.runtime.rng import RowRandom
from calm_cli.runtime.runners import CALMRunner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> CALM:
    torch.manual_seed(0)
    return CALM(*preset_configs(PRESETS["tiny"], 4)).eval().requires_grad_(False)


def test_auto_is_bf16_only_for_float32_models_where_bf16_is_fast() -> None:
    expected = torch.bfloat16 if has_fast_bf16(CPU) else torch.float32
    assert resolve_candidate_dtype("auto", torch.float32, CPU) == expected
    assert resolve_candidate_dtype("auto", torch.float16, CPU) == torch.float16
    assert resolve_candidate_dtype("float32", torch.float32, CPU) == torch.float32
    assert resolve_candidate_dtype("bf16", torch.float32, CPU) == torch.bfloat16
    with pytest.raises(UsageError):
        resolve_candidate_dtype("fp8", torch.float32, CPU)


def test_bf16_copies_leave_the_model_in_float32(tiny: CALM) -> None:
    runner = CALMRunner(tiny, "fast", "bf16")
    assert next(runner.head.parameters()).dtype == torch.bfloat16
    assert next(tiny.generative_head.parameters()).dtype == torch.float32
    assert next(tiny.ae_model.decoder.parameters()).dtype == torch.float32
    assert runner.decoder.lm_head_weight is None  # the output matrix is not copied
    assert CALMRunner(tiny, "fast", "float32").head is tiny.generative_head


def test_bf16_candidates_get_the_float32_argmax_of_their_states(tiny: CALM) -> None:
    """The certificate takes the bf16 layers' states as given: each chunk is the float32 argmax of W h for them."""
    runner = CALMRunner(tiny, "fast", "bf16")
    hidden = torch.randn(3, tiny.config.hidden_size)
    with torch.inference_mode():
        latents = runner.latents(hidden, RowRandom.from_seeds([1, 2, 3]), 200)
        chunks = runner.decode_chunks(latents)
        states = runner.token_states(latents.unsqueeze(-2))
        dense = F.linear(states, tiny.ae_model.decoder.lm_head_weight).argmax(-1)
    assert latents.dtype == torch.bfloat16 and states.dtype == torch.float32
    assert isinstance(runner.decode_chunks, FastCandidateDecoder)
    stats = runner.decode_chunks.stats
    assert stats.rows == 3 * 200 * 4 and stats.dense < stats.rows  # the bf16 scores did decide rows
    assert torch.equal(chunks, dense)


def test_the_bf16_path_stays_close_to_float32(tiny: CALM) -> None:
    """Same noise through both paths: most candidates decode to the same chunk (a broken cast would not)."""
    hidden = torch.randn(2, tiny.config.hidden_size)
    chunks = {}
    for name in ("float32", "bf16"):
        runner = CALMRunner(tiny, "dense", name)
        with torch.inference_mode():
            chunks[name] = runner.decode_chunks(runner.latents(hidden, RowRandom.from_seeds([4, 5]), 100))
    agree = (chunks["float32"] == chunks["bf16"]).float().mean().item()
    assert agree > 0.8
