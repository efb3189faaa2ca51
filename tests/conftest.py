from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "official-tiny"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / "reference.safetensors"))


@pytest.fixture(scope="session")
def tiny_model():
    from calm_cli import load_model

    return load_model(FIXTURES / "calm")
