"""The default model loaded once for the unit tests that run the engine on it."""

from __future__ import annotations

import pytest

from bucketserve.config import EngineConfig
from bucketserve.executor.hf import HFExecutor
from bucketserve.factory import LoadedModel, load_model


@pytest.fixture(scope="session")
def model(model_dir) -> LoadedModel:
    return load_model(EngineConfig(device="cpu"), str(model_dir), log=lambda _m: None)


@pytest.fixture(scope="session")
def runner(model) -> HFExecutor:
    return model.executor
