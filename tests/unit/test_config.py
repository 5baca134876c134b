"""Engine parameters: conversion, checks, and the documented config.pbtxt kept in step with the code."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from bucketserve.config import MODEL_PATH_ENV, PARAMS_ENV, ConfigError, EngineConfig, parse_param
from bucketserve.triton.interface import INPUTS, OUTPUTS


def test_parameters_are_converted():
    c = EngineConfig.from_parameters({"max_num_seqs": " 8 ", "default_temperature": "0", "device": "cpu",
                                      "bucket_symmetric_split": "true"})
    assert (c.max_num_seqs, c.default_temperature, c.device, c.bucket_symmetric_split) == (8, 0.0, "cpu", True)


@pytest.mark.parametrize("params, message", [
    ({"max_num_seq": "8"}, "unknown parameter 'max_num_seq'"),
    ({"max_num_seqs": "eight"}, "must be int"),
    ({"max_num_seqs": "0"}, "max_num_seqs must be >= 1"),
    ({"dtype": "float8"}, "dtype must be"),
    ({"device": "tpu"}, "device must be"),
    ({"scheduler_policy": "random"}, "scheduler_policy must be one of"),
    ({"bucket_symmetric_split": "maybe"}, "must be bool"),
    ({"kv_safety": "1.5"}, "kv_safety must be in (0, 1]"),
    ({"offline_order": "random"}, "offline_order must be sjf or ljf"),
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


def test_prefill_batches_default_by_device_and_a_set_value_stands():
    assert EngineConfig().max_prefill_tokens == 0
    assert EngineConfig().on_device("cpu").max_prefill_tokens == 2048
    assert EngineConfig().on_device("cuda:1").max_prefill_tokens == 4096
    assert EngineConfig(max_prefill_tokens=8192).on_device("cpu").max_prefill_tokens == 8192
    with pytest.raises(ConfigError, match="max_prefill_tokens must be >= 0"):
        EngineConfig(max_prefill_tokens=-1)


def test_command_line_parameters_override_config_pbtxt(monkeypatch):
    monkeypatch.setenv(PARAMS_ENV, '{"dtype": "bfloat16", "max_num_seqs": "8"}')
    c = EngineConfig.from_model_config({"dtype": "float32", "scheduler_policy": "continuous"})
    assert (c.dtype, c.max_num_seqs, c.scheduler_policy) == ("bfloat16", 8, "continuous")
    monkeypatch.setenv(PARAMS_ENV, '{"max_num_seqs": "0"}')
    with pytest.raises(ConfigError, match="max_num_seqs must be >= 1"):
        EngineConfig.from_model_config({})
    for bad in ("[1]", '{"dtype": 1}', "{oops"):
        monkeypatch.setenv(PARAMS_ENV, bad)
        with pytest.raises(ConfigError, match=PARAMS_ENV):
            EngineConfig.from_model_config({})


def test_param_flag_parsing():
    assert parse_param("dtype=bfloat16") == ("dtype", "bfloat16")
    assert parse_param("stream_interval_ms=0") == ("stream_interval_ms", "0")
    for bad, message in (("dtype", "KEY=VALUE"), ("=1", "KEY=VALUE"), ("max_num_seq=8", "unknown parameter")):
        with pytest.raises(ConfigError, match=message):
            parse_param(bad)


REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def pbtxt_parameters(text: str) -> dict[str, str]:
    return dict(re.findall(r'key: "(\w+)"\s*value: \{ string_value: "([^"]*)" \}', text))


def test_the_documented_config_lists_every_parameter_at_its_default():
    params = pbtxt_parameters((REPOSITORY / "bucketserve" / "config.pbtxt").read_text())
    assert set(params) == {f.name for f in fields(EngineConfig)}
    assert EngineConfig.from_parameters(params) == EngineConfig()


def test_the_documented_config_declares_the_interface_auto_complete_fills_in():
    text = (REPOSITORY / "bucketserve" / "config.pbtxt").read_text()
    declared = re.findall(r'(input|output) \{\s*name: "(\w+)"\s*data_type: (\w+)\s*dims: \[ ([-\d, ]+) \]', text)
    tensors = {"input": [], "output": []}
    for kind, name, dtype, dims in declared:
        tensors[kind].append((name, dtype, [int(d) for d in dims.split(",")]))
    assert tensors == {"input": list(INPUTS), "output": list(OUTPUTS)}


def test_each_baseline_model_is_the_same_engine_with_another_policy():
    models = {p.parent.name: pbtxt_parameters(p.read_text()) for p in REPOSITORY.glob("*/config.pbtxt")}
    policies = {name: EngineConfig.from_parameters(params).scheduler_policy for name, params in models.items()}
    assert policies == {"bucketserve": "bucket", "bucketserve_continuous": "continuous",
                        "bucketserve_fcfs_static": "fcfs_static"}
    for name in models:
        assert f'name: "{name}"' in (REPOSITORY / name / "config.pbtxt").read_text()
        assert (REPOSITORY / name / "1" / "model.py").read_text() == (REPOSITORY / "bucketserve" / "1" / "model.py").read_text()


def test_a_kind_gpu_instance_runs_on_the_gpu_triton_assigned_it():
    assert EngineConfig().instance_device("GPU", "3") == "cuda:3"
    assert EngineConfig().instance_device("MODEL", "0") == "auto"  # KIND_MODEL / KIND_CPU: the engine picks
    assert EngineConfig().instance_device("CPU", "0") == "auto"
    assert EngineConfig(device="cpu").instance_device("GPU", "1") == "cpu"  # an explicit device wins


def test_dtype_auto_keeps_the_checkpoint_on_the_cpu():
    import torch

    from bucketserve.executor.device import pick_dtype

    assert pick_dtype("auto", torch.device("cpu")) is None
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) is torch.float16
