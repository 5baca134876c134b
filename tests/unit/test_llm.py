"""The in-process API (`LLM`, `bucketserve generate`): the same engine as the server, the same greedy tokens
as transformers' generate(), stop strings and finish reasons owned by the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bucketserve import LLM, InvalidInput, Priority, SamplingParams
from bucketserve.cli import main as cli_main

PROMPTS = ["Hello", "def add(a, b):\n    return a + b\n" * 8, "The quick brown fox jumps over the lazy dog. " * 4]


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), device="cpu") as llm:
        yield llm


def test_generate_returns_one_output_per_prompt_with_generates_greedy_tokens(llm, reference):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    for out in outs:
        ids = llm.tokenizer(out.prompt).input_ids
        assert out.token_ids == reference(ids, 12)
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert (out.finish_reason, out.num_input_tokens, out.num_output_tokens, out.error) == ("length", len(ids), 12, None)


def test_token_id_prompts_generate_what_their_text_does(llm):
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    by_text = llm.generate(PROMPTS[1:], sampling, use_tqdm=False)
    ids = [llm.tokenizer(p).input_ids for p in PROMPTS[1:]]
    by_ids = llm.generate([{"prompt_token_ids": i} for i in ids], sampling, use_tqdm=False)
    assert [o.token_ids for o in by_ids] == [o.token_ids for o in by_text]
    assert [o.num_input_tokens for o in by_ids] == [len(i) for i in ids]
    with pytest.raises(InvalidInput, match="prompt_token_ids"):
        llm.generate({"prompt_ids": [1, 2]}, sampling, use_tqdm=False)


def test_per_prompt_sampling_and_priorities(llm):
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 7, 5)]
    outs = llm.generate(PROMPTS, params, priority=[Priority.ONLINE, Priority.OFFLINE, Priority.ONLINE], use_tqdm=False)
    assert [o.num_output_tokens for o in outs] == [3, 7, 5]


def test_stream_yields_deltas_that_add_up_to_generate(llm):
    sampling = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    [whole] = llm.generate(PROMPTS[1], sampling, use_tqdm=False)
    deltas = list(llm.stream(PROMPTS[1], sampling))
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_a_stop_string_ends_the_text_before_it(llm):
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    [free] = llm.generate(PROMPTS[2], sampling, use_tqdm=False)
    stop = free.text[10:14]
    assert stop.strip(), free.text  # the greedy continuation has text to stop at
    [stopped] = llm.generate(PROMPTS[2], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,)),
                             use_tqdm=False)
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]


def test_leaving_a_stream_early_cancels_the_request(llm):
    for delta in llm.stream(PROMPTS[0], SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)):
        break
    from tests.waiting import wait_for

    wait_for(lambda: llm.engine.stats.running == 0 and llm.engine.stats.kv_bytes == 0, timeout=30)


def test_a_bad_prompt_is_refused_before_anything_runs(llm):
    with pytest.raises(InvalidInput, match="prompt index 1: .*beyond the context"):
        llm.generate(["fine", "x"], [SamplingParams(), SamplingParams(max_tokens=10**6)], use_tqdm=False)
    with pytest.raises(InvalidInput, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_generate_command_runs_a_jsonl_file(model_dir, tmp_path, capsys):
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            {"prompt": "import os", "max_tokens": "6", "temperature": 0, "ignore_eos": True, "priority": 1, "logprobs": 2}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert cli_main(["generate", "--input", str(source), "--output", str(target), "--model-path", str(model_dir),
                     "--param", "device=cpu"]) == 0
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(o["prompt"], o["num_output_tokens"], o["finish_reason"], o["error"]) for o in out] == [
        ("Hello", 4, "length", None), ("import os", 6, "length", None)]
    assert "logprobs" not in out[0] and len(out[1]["logprobs"]) == len(out[1]["token_ids"]) == 6
    assert all(lp["rank"] == 1 and len(lp["top"]) == 2 and lp["top"][0][1] == lp["logprob"] for lp in out[1]["logprobs"])
    source.write_text(json.dumps({"prompt": "hi", "top_k": -1}) + "\n")
    assert cli_main(["generate", "--input", str(source), "--output", str(target), "--model-path", str(model_dir)]) == 2
    assert "in.jsonl:1: top_k must be >= 0" in capsys.readouterr().err


def test_logprobs_and_repetition_penalty_match_transformers(llm, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = llm.tokenizer(PROMPTS[1]).input_ids
    [out] = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3,
                                                   repetition_penalty=1.3), use_tqdm=False)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=8, do_sample=False, repetition_penalty=1.3)[0, len(ids):].tolist()
        # the model's own distribution at each generated position, before the penalty
        logprobs = model(torch.tensor([ids + want])).logits[0, len(ids) - 1:-1].log_softmax(-1)
    assert out.token_ids == want
    assert len(out.logprobs) == 8 and out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))
    for step, (token, lp) in enumerate(zip(want, out.logprobs)):
        assert lp.logprob == pytest.approx(logprobs[step, token].item(), abs=1e-4)
        assert lp.rank == int((logprobs[step] > logprobs[step, token]).sum()) + 1
        best = logprobs[step].topk(3)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)
    [plain] = llm.generate(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_the_text_thread_runs_at_the_lowest_cpu_priority(llm):
    """So that it takes the gaps between the model's parallel regions instead of stalling one."""
    output = next(t for t in threading.enumerate() if t.name == "bucketserve-output")
    fields = Path(f"/proc/self/task/{output.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(fields[16]) == 19  # the 19th field of stat: nice
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19  # the caller's thread is left alone


def test_importing_bucketserve_makes_openmp_threads_wait_passively_unless_told_otherwise():
    script = "import os, bucketserve; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"
