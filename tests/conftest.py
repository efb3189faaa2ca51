from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "official-tiny"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cuda", action="store_true",
        help="run the tests marked `cuda` on the CUDA device (without it CUDA is hidden from every test and subprocess)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device; runs only under `pytest --cuda`")
    if config.getoption("--cuda"):
        if not torch.cuda.is_available():
            raise pytest.UsageError("--cuda: torch sees no CUDA device")
    else:
        # A GPU box must not change what the suite means: with no --cuda, the tests, their `calm`
        # subprocesses and `--device auto` all run on the CPU in the CPU's dtypes.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--cuda"):
        return
    skip = pytest.mark.skip(reason="needs `pytest --cuda` and a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
