"""The in-process tools: bench-policies runs every policy through the factory's engine and says what it ran."""

from __future__ import annotations

import json

from bucketserve.cli import main as cli_main


def test_bench_policies_reports_each_policy_and_its_provenance(model_dir, tmp_path, capsys):
    out = tmp_path / "policies.json"
    assert cli_main(["bench-policies", "--model-path", str(model_dir), "--requests", "6", "--device", "cpu",
                     "--param", "max_model_len=1024", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| bucket |" in table and "| continuous |" in table and "| fcfs_static |" in table
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == ["bucket", "continuous", "fcfs_static"]
    assert all(r["output_tokens"] > 0 and 0 <= r["decode_padding"] < 1 for r in report["results"])
    env = report["environment"]
    assert env["torch"] and env["cores"] >= 1 and env["model"]["executor"] == "paged"
    assert env["model"]["parameters"] > 1_000_000 and env["engine"]["max_model_len"] == 1024
