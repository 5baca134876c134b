"""The security statements README makes, checked: nothing from a request is evaluated, unpickled or
used as a path, and only the operator chooses the model."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from bucketserve.config import EngineConfig
from bucketserve.engine.request import InvalidInput
from bucketserve.triton.inputs import parse_request

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "backend").rglob("*.py"), *(ROOT / "client").rglob("*.py"),
                  *(ROOT / "model_repository").rglob("*.py")])
DANGEROUS_CALLS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}


def test_the_sources_were_found():
    assert len(SOURCES) > 20 and any(p.name == "inputs.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_evaluates_or_unpickles_anything(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in DANGEROUS_CALLS, f"{path}:{node.lineno} calls {node.func.id}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert not (node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in ("yaml", "torch")), f"{path}:{node.lineno} unsafe load"
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            continue
        assert not names & DANGEROUS_MODULES, f"{path}:{node.lineno} imports {names & DANGEROUS_MODULES}"


def prompt(text: str = "hi") -> dict[str, np.ndarray]:
    return {"text_input": np.array([text.encode()], dtype=np.object_)}


@pytest.mark.parametrize("key", ["model_path", "model", "path", "tokenizer", "device", "kv_cache_bytes"])
def test_a_request_cannot_name_a_model_path_or_a_server_setting(key):
    with pytest.raises(InvalidInput, match=f"unknown key '{key}'"):
        parse_request({**prompt(), "sampling_parameters": np.array([f'{{"{key}": "/etc/passwd"}}'.encode()],
                                                                    dtype=np.object_)}, {}, 16, 1.0)
    with pytest.raises(InvalidInput, match=f"unknown key '{key}'"):
        parse_request(prompt(), {key: "/etc/passwd"}, 16, 1.0)


def test_the_model_path_comes_from_the_operator_only(monkeypatch, tmp_path):
    """config.pbtxt's model_path (relative to the model's directory) or the operator's environment."""
    monkeypatch.delenv("BUCKETSERVE_MODEL_PATH", raising=False)
    config = EngineConfig(model_path="weights")
    assert config.resolve_model_path(str(tmp_path), "/default") == (str(tmp_path / "weights"), "config.pbtxt model_path")
    assert EngineConfig().resolve_model_path(str(tmp_path), "/default") == ("/default", "default model")
    monkeypatch.setenv("BUCKETSERVE_MODEL_PATH", "/srv/model")
    assert config.resolve_model_path(str(tmp_path), "/default")[0] == "/srv/model"
