"""Shared fixtures: tiny random-weight models of each supported family, built once per session."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# CI replays the same examples every run (a landing must not hinge on luck); local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and server subprocesses share the cores

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_root):
    """tiny_model(family) -> path of a saved tiny HF model of that family (cached for the session)."""
    from tests.tiny_models import make_tiny_model

    cache: dict[str, str] = {}

    def get(family: str = "llama") -> str:
        if family not in cache:
            cache[family] = str(make_tiny_model(family, tiny_model_root / family))
        return cache[family]

    return get
