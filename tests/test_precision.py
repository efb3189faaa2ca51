"""The candidate path's dtype: which one `auto` picks, the model left alone, and the certificate on bf16 states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calm_cli.bench.run import PRESETS, preset_configs
from calm_cli.errors import UsageError
from calm_cli.models.calm import CALM
from calm_cli.runtime.fastdecode import FastCandidateDecoder
from calm_cli.runtime.precision import candidate_dtypes, has_fast_bf16
from calm_cli.runtime.rng import RowRandom
from calm_cli.runtime.runners import CALMRunner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> CALM:
    torch.manual_seed(0)
    return CALM(*preset_configs(PRESETS["tiny"], 4)).eval().requires_grad_(False)


def test_auto_puts_pools_of_float32_models_in_bf16_where_bf16_is_fast() -> None:
    expected = torch.bfloat16 if has_fast_bf16(CPU) else torch.float32
    assert candidate_dtypes("auto", torch.float32, CPU) == (expected, torch.float32)
    assert candidate_dtypes("auto", torch.float16, CPU) == (torch.float16, torch.float16)
    assert candidate_dtypes("float32", torch.float32, CPU) == (torch.float32, torch.float32)
    assert candidate_dtypes("bf16", torch.float32, CPU) == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(UsageError):
        candidate_dtypes("fp8", torch.float32, CPU)


def test_t1_draws_stay_float32_under_auto(tiny: CALM) -> None:
    runner = CALMRunner(tiny, "fast", "auto")
    assert runner.path(1.0).dtype == torch.float32 and runner.path(1.0 - 1e-12).dtype == torch.float32
    assert runner.path(0.5).dtype == runner.path(0.0).dtype == candidate_dtypes("auto", torch.float32, CPU)[0]


def test_bf16_copies_leave_the_model_in_float32(tiny: CALM) -> None:
    path = CALMRunner(tiny, "fast", "bf16").pool
    assert next(path.head.parameters()).dtype == torch.bfloat16
    assert next(tiny.generative_head.parameters()).dtype == torch.float32
    assert next(tiny.ae_model.decoder.parameters()).dtype == torch.float32
    assert path.decoder.lm_head_weight is None  # the output matrix is not copied
    assert CALMRunner(tiny, "fast", "float32").pool.head is tiny.generative_head


def test_bf16_candidates_get_the_float32_argmax_of_their_states(tiny: CALM) -> None:
    """The certificate takes the bf16 layers' states as given: each chunk is the float32 argmax of W h for them."""
    path = CALMRunner(tiny, "fast", "bf16").pool
    hidden = torch.randn(3, tiny.config.hidden_size)
    with torch.inference_mode():
        latents = path.latents(hidden, RowRandom.from_seeds([1, 2, 3]), 200)
        chunks = path.decode_chunks(latents)
        states = path.states(latents.unsqueeze(-2))
        dense = F.linear(states, tiny.ae_model.decoder.lm_head_weight).argmax(-1)
    assert latents.dtype == torch.bfloat16 and states.dtype == torch.float32
    assert isinstance(path.decode_chunks, FastCandidateDecoder)
    stats = path.decode_chunks.stats
    assert stats.rows == 3 * 200 * 4 and stats.dense < stats.rows  # the bf16 scores did decide rows
    assert torch.equal(chunks, dense)


def test_the_bf16_path_stays_close_to_float32(tiny: CALM) -> None:
    """Same noise through both paths: most candidates decode to the same chunk (a broken cast would not)."""
    hidden = torch.randn(2, tiny.config.hidden_size)
    chunks = {}
    for name in ("float32", "bf16"):
        path = CALMRunner(tiny, "dense", name).pool
        with torch.inference_mode():
            chunks[name] = path.decode_chunks(path.latents(hidden, RowRandom.from_seeds([4, 5]), 100))
    agree = (chunks["float32"] == chunks["bf16"]).float().mean().item()
    assert agree > 0.8
