"""Which malloc the `bucketserve` commands run under: tcmalloc where the machine has it (the command re-executes
itself with it preloaded), glibc's when told or when there is none, and a clear error for a bad setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bucketserve.launcher import allocator


def test_tcmalloc_is_chosen_from_the_library_dirs_when_present(tmp_path):
    empty, libs = tmp_path / "empty", tmp_path / "libs"
    empty.mkdir()
    libs.mkdir()
    (libs / "libtcmalloc_minimal.so.4").write_bytes(b"")
    dirs = (str(empty), str(libs))
    assert allocator.chosen_library("", dirs) == str(libs / "libtcmalloc_minimal.so.4")
    assert allocator.chosen_library("tcmalloc", dirs) == str(libs / "libtcmalloc_minimal.so.4")
    assert allocator.chosen_library("tcmalloc", (str(empty),)) is None  # none installed: glibc's
    assert allocator.chosen_library("system", dirs) is None
    other = libs / "libjemalloc.so.2"
    other.write_bytes(b"")
    assert allocator.chosen_library(str(other), dirs) == str(other)
    with pytest.raises(allocator.AllocatorError, match="BUCKETSERVE_MALLOC=/no/such.so"):
        allocator.chosen_library("/no/such.so", dirs)


def test_the_library_goes_first_in_ld_preload_once():
    assert allocator.preload_env({"A": "1"}, "/l/tc.so") == {"A": "1", "LD_PRELOAD": "/l/tc.so"}
    assert allocator.preload_env({"LD_PRELOAD": "/x.so"}, "/l/tc.so")["LD_PRELOAD"] == "/l/tc.so:/x.so"
    assert allocator.preload_env({"LD_PRELOAD": "/x.so:/l/tc.so"}, "/l/tc.so") is None  # no second re-exec


def _generate(model_dir, tmp_path, setting: str) -> subprocess.CompletedProcess:
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello", "max_tokens": 2}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env[allocator.ALLOCATOR_ENV] = setting
    return subprocess.run([sys.executable, "-m", "bucketserve.cli", "generate", "--input", str(prompts),
                           "--output", str(tmp_path / "out.jsonl"), "--model-path", str(model_dir)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_command_runs_under_tcmalloc_where_found_and_glibc_when_told(model_dir, tmp_path):
    library = allocator.find_tcmalloc()
    if library is None:
        pytest.skip("no tcmalloc on this machine (make setup installs libtcmalloc-minimal4 where it can)")
    run = _generate(model_dir, tmp_path, "tcmalloc")
    assert run.returncode == 0, run.stderr
    assert f"malloc: {os.path.realpath(library)}" in run.stderr
    run = _generate(model_dir, tmp_path, "system")
    assert run.returncode == 0, run.stderr
    assert "malloc: glibc's" in run.stderr


def test_a_bad_setting_stops_the_command_with_what_was_wrong(model_dir, tmp_path):
    run = _generate(model_dir, tmp_path, "/no/such/malloc.so")
    assert run.returncode == 2
    assert "BUCKETSERVE_MALLOC=/no/such/malloc.so: not tcmalloc, system or an existing library file" in run.stderr
