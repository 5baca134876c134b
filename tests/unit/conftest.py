"""The default model, loaded once per executor, for the unit tests that run the engine on it: every such
test runs on our paged executor and on the transformers one. Pages of 16 positions: the tests give budgets
of a few hundred positions, which pages of the default 128 would round away (the integration tests and
``LLM`` tests run the default)."""

from __future__ import annotations

import pytest

from bucketserve.config import EngineConfig
from bucketserve.engine.executor import Executor
from bucketserve.factory import LoadedModel, load_model


@pytest.fixture(scope="session", params=["paged", "hf"])
def model(model_dir, request) -> LoadedModel:
    return load_model(EngineConfig(device="cpu", executor=request.param, kv_page_size=16), str(model_dir),
                      log=lambda _m: None)


@pytest.fixture(scope="session")
def hf_model(model_dir) -> LoadedModel:
    return load_model(EngineConfig(device="cpu", executor="hf"), str(model_dir), log=lambda _m: None)


@pytest.fixture(scope="session")
def runner(model) -> Executor:
    return model.executor
