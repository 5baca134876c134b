"""The in-process tools: bench-policies runs every policy through the factory's engine and says what it ran;
the default model gains a chat template when it was built without one."""

from __future__ import annotations

import json
import shutil

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


def test_a_default_model_built_without_a_chat_template_gets_one(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from bucketserve.tools.model_builder import add_chat_template

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # as the builder wrote it before templates
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is None
    add_chat_template(tmp_path, log=lambda _m: None)
    ids = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|user|>\nhi\n<|assistant|>\n")
