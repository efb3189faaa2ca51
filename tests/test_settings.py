"""The settings gate: one check per field, worded by each front end with its own names."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from calm_cli.cli.common import FLAGS, typed_engine_options, typed_settings
from calm_cli.errors import UsageError
from calm_cli.runtime.settings import MAX_BETA, GenerationSettings, SettingsError, draws_one, inverse_temperature
from calm_cli.serve.app import FIELDS


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": 2.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"num_samples": 0}, "num_samples"),
        ({"sampler": "greedy"}, "sampler"),
        ({"seed": -1}, "seed"),
    ],
)
def test_construction_and_replace_both_pass_the_gate(changes: dict, field: str) -> None:
    with pytest.raises(SettingsError) as info:
        GenerationSettings(**changes)
    assert info.value.field == field and str(info.value).startswith(f"{field} must be")
    with pytest.raises(SettingsError):
        replace(GenerationSettings(), **changes)


def test_each_front_end_names_the_field_its_own_way() -> None:
    with pytest.raises(SettingsError) as info:
        GenerationSettings(temperature=2.0, num_samples=3)
    assert info.value.named(FLAGS).startswith("--temp must be in [0, 1], got 2")
    assert info.value.named(FIELDS).startswith("temperature must be in [0, 1], got 2")
    with pytest.raises(UsageError, match="^--samples must be"):
        typed_settings(num_samples=0)
    with pytest.raises(SettingsError) as samples:
        GenerationSettings(num_samples=0)
    assert samples.value.named(FIELDS).startswith("samples must be")


def test_inverse_temperature_snaps_whole_numbers_and_draws_one_only_at_one() -> None:
    assert inverse_temperature(1 / 3) == 3.0 and inverse_temperature(0.4) == 2.5
    assert inverse_temperature(0.0) == math.inf and inverse_temperature(0.5 / MAX_BETA) == math.inf
    assert draws_one(1.0) and draws_one(1 / (1 + 1e-12)) and not draws_one(0.5) and not draws_one(0.0)


def test_engine_options_are_checked_before_torch_and_compile_defaults_to_the_device() -> None:
    import torch

    from calm_cli.runtime.engine import compile_by_default
    from calm_cli.runtime.settings import EngineOptions

    with pytest.raises(UsageError, match="^--candidate-decoder must be"):
        typed_engine_options(candidate_decoder="sparse")
    with pytest.raises(UsageError, match="^--max-batch must be at least 1"):
        typed_engine_options(max_batch=0)
    with pytest.raises(SettingsError, match="^candidate_dtype must be"):
        EngineOptions(candidate_dtype="fp8")
    assert compile_by_default(torch.device("cuda")) and not compile_by_default(torch.device("cpu"))
