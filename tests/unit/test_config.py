from __future__ import annotations

import pytest

from bucketserve.config import MODEL_PATH_ENV, ConfigError, EngineConfig


def test_parameters_are_converted():
    c = EngineConfig.from_parameters({"max_num_seqs": " 8 ", "default_temperature": "0", "device": "cpu"})
    assert (c.max_num_seqs, c.default_temperature, c.device) == (8, 0.0, "cpu")


@pytest.mark.parametrize("params, message", [
    ({"max_num_seq": "8"}, "unknown parameter 'max_num_seq'"),
    ({"max_num_seqs": "eight"}, "must be int"),
    ({"max_num_seqs": "0"}, "max_num_seqs must be >= 1"),
    ({"dtype": "float8"}, "dtype must be"),
    ({"device": "tpu"}, "device must be"),
    ({"scheduler_policy": "random"}, "scheduler_policy must be one of"),
])
def test_bad_parameters_fail_the_load(params, message):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_parameters(params)
    assert message in str(info.value)


def test_model_path_precedence(monkeypatch):
    monkeypatch.delenv(MODEL_PATH_ENV, raising=False)
    assert EngineConfig().resolve_model_path("/repo/m", "/default") == ("/default", "default model")
    assert EngineConfig(model_path="../w").resolve_model_path("/repo/m", "/d")[0] == "/repo/w"
    monkeypatch.setenv(MODEL_PATH_ENV, "/cli")
    assert EngineConfig(model_path="../w").resolve_model_path("/repo/m", "/d")[0] == "/cli"
