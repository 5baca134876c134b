"""The simulator: its cost model's roofline, the engine's own scheduler stepped in simulated time, the CLI's
report, and (against the real executor on this machine) calibration and a prediction within its bound."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from bucketserve.cli import main as bucketserve
from bucketserve.config import EngineConfig
from bucketserve.sim.cost import CostModel
from bucketserve.sim.hardware import PRESETS as HARDWARE
from bucketserve.sim.hardware import Hardware
from bucketserve.sim.runner import kv_transfer_s, simulate, simulate_split
from bucketserve.sim.shape import PRESETS as MODELS
from bucketserve.sim.shape import ModelShape
from bucketserve_client.workload import DEFAULT_CLASSES, generate

A100, LLAMA_7B = HARDWARE["a100-40gb"], MODELS["llama-2-7b"]


def test_llama_presets_have_their_published_sizes():
    assert 6.6e9 < LLAMA_7B.num_parameters < 6.8e9
    assert 12.9e9 < MODELS["llama-2-13b"].num_parameters < 13.1e9
    assert 7.9e9 < MODELS["llama-3-8b"].num_parameters < 8.1e9


def test_decode_is_memory_bound_and_prefill_compute_bound():
    cost = CostModel(A100, LLAMA_7B)
    weights_read = LLAMA_7B.num_parameters * 2 / A100.mem_bw
    one_row = cost.decode_s([100])
    assert weights_read < one_row < weights_read * 1.2 + cost.fixed_s(1)
    # 8 rows read the same weights once: barely slower than one
    assert cost.decode_s([100] * 8) < 1.1 * one_row
    # a long prefill costs in proportion to its tokens
    assert cost.prefill_s([2000]) / cost.prefill_s([1000]) > 1.8


def test_a_cpu_matmul_adds_its_compute_and_its_weight_read():
    """GPUs overlap the two (the roofline: the longer); the calibrated CPU profile adds them."""
    gpu = CostModel(replace(A100, matmul_overlap=1.0), LLAMA_7B)
    cpu = CostModel(replace(A100, matmul_overlap=0.0), LLAMA_7B)
    params = 10**8
    compute, read = 2 * 64 * params / A100.matmul_flops, params * 2 / A100.mem_bw
    assert gpu.matmul_s(64, params) == pytest.approx(max(compute, read))
    assert cpu.matmul_s(64, params) == pytest.approx(compute + read)


def test_simulated_engines_take_their_devices_defaults():
    from bucketserve.sim.runner import Replica

    cpu = replace(A100, device="cpu")
    assert Replica(EngineConfig(), CostModel(cpu, LLAMA_7B), lambda _n: None).core.scheduler.max_prefill_tokens == 2048
    assert Replica(EngineConfig(), CostModel(A100, LLAMA_7B), lambda _n: None).core.scheduler.max_prefill_tokens == 4096


def test_padding_and_tensor_parallelism_cost_what_they_should():
    cost = CostModel(A100, LLAMA_7B)
    assert cost.prefill_s([50, 1500], padded=True) > 1.5 * cost.prefill_s([50, 1500])
    split = CostModel(A100, LLAMA_7B, devices=2)
    assert cost.prefill_s([2000]) / 2 < split.prefill_s([2000]) < cost.prefill_s([2000])
    assert split.all_reduce_s(2000) > 0 == cost.all_reduce_s(2000)


def test_only_the_sampled_rows_run_the_last_layer_past_its_keys_and_values():
    """Our executor runs the last layer's attention, o and MLP for each prompt's last position and each decode row;
    transformers' padded prefill runs it for every position. A decode step samples every row: no difference."""
    cost, m = CostModel(replace(A100, matmul_overlap=0.0), LLAMA_7B), LLAMA_7B
    rest = m.layer_params - m.qkv_params
    saved = cost.matmul_s(2000, rest) - cost.matmul_s(1, rest)
    attention = 2 * 2000 * 2000 * m.heads * m.head_dim / A100.attention_flops
    every_row = cost.step_s([(2000, 0)], 1, [], sampled_last_layer=False)
    assert cost.step_s([(2000, 0)], 1, []) == pytest.approx(every_row - saved - attention)
    assert cost.prefill_s([2000, 2000], padded=True) == pytest.approx(
        cost.step_s([(2000, 0)] * 2, 2, [], sampled_last_layer=False))
    assert cost.decode_s([100] * 8) == pytest.approx(cost.step_s([], 0, [100] * 8, sampled_last_layer=False))


def _specs(n: int, workload: str = "mixed", seed: int = 0):
    return generate(workload, n, LLAMA_7B.max_len, seed, 0.2, DEFAULT_CLASSES)


def test_one_request_alone_takes_exactly_its_steps():
    """Prefill, then the first token; then one decode step per further token, contexts growing by one."""
    cost = CostModel(A100, LLAMA_7B)
    spec = replace(_specs(1)[0], prompt_len=300, output_len=5, deadline=False)
    run = simulate(EngineConfig(), cost, [spec], [2.0])
    [outcome] = run.outcomes
    expected_ttft = cost.prefill_s([300])
    decodes = sum(cost.decode_s([300 + k]) for k in range(1, 5))
    assert outcome.ok and outcome.output_tokens == 5 and outcome.sent == 2.0
    assert outcome.ttft == pytest.approx(expected_ttft, rel=1e-9)
    assert outcome.e2e == pytest.approx(expected_ttft + decodes, rel=1e-9)


def test_a_long_prompt_alone_is_prefilled_in_chunks_of_the_step_budget():
    """As the paged executor runs it: 300 prompt tokens at 128 a step take three forwards, each chunk attending to
    the positions before it; only the last gives the first token."""
    cost = CostModel(A100, LLAMA_7B)
    spec = replace(_specs(1)[0], prompt_len=300, output_len=3, deadline=False)
    [outcome] = simulate(EngineConfig(max_prefill_tokens=128), cost, [spec], [0.0]).outcomes
    chunks = cost.step_s([(128, 0)], 0, []) + cost.step_s([(128, 128)], 0, []) + cost.step_s([(44, 256)], 1, [])
    assert cost.step_s([(44, 256)], 1, []) > cost.prefill_s([44])  # the context's keys cost attention
    assert outcome.ok and outcome.output_tokens == 3
    assert outcome.ttft == pytest.approx(chunks, rel=1e-9)
    assert outcome.e2e == pytest.approx(chunks + cost.decode_s([301]) + cost.decode_s([302]), rel=1e-9)


def test_split_prefill_and_decode_add_the_kv_transfer():
    """Disaggregated: the first token comes from the prefill devices; the rest after the KV has moved."""
    cost = CostModel(A100, LLAMA_7B)
    spec = replace(_specs(1)[0], prompt_len=300, output_len=5, deadline=False)
    [outcome] = simulate_split(EngineConfig(), cost, [spec], [1.0]).outcomes
    decodes = sum(cost.decode_s([300 + k]) for k in range(1, 5))
    assert kv_transfer_s(cost, 300) > A100.link_latency_s
    assert outcome.ok and outcome.output_tokens == 5
    assert outcome.ttft == pytest.approx(cost.prefill_s([300]), rel=1e-9)
    assert outcome.e2e == pytest.approx(cost.prefill_s([300]) + kv_transfer_s(cost, 300) + decodes, rel=1e-9)


@pytest.mark.parametrize("policy", ["bucket", "continuous", "fcfs_static"])
def test_split_ends_every_request_once_with_its_tokens(policy):
    specs = [replace(s, deadline=False) for s in _specs(300)]
    run = simulate_split(EngineConfig(scheduler_policy=policy), CostModel(A100, LLAMA_7B), specs,
                         [0.01 * i for i in range(len(specs))])
    assert all(o.ok and o.output_tokens == s.output_len for o, s in zip(run.outcomes, specs))
    assert run.stats.output_tokens == sum(s.output_len for s in specs)


@pytest.mark.parametrize("policy", ["bucket", "continuous", "fcfs_static"])
def test_every_request_ends_once_with_its_tokens_within_the_kv_budget(policy):
    specs = [replace(s, deadline=False) for s in _specs(300)]
    config = EngineConfig(scheduler_policy=policy)
    run = simulate(config, CostModel(A100, LLAMA_7B), specs, [0.01 * i for i in range(len(specs))])
    assert len(run.outcomes) == len(specs)
    assert all(o.ok and o.output_tokens == s.output_len for o, s in zip(run.outcomes, specs))
    assert all(0 < o.ttft <= o.e2e for o in run.outcomes)
    assert 0 < run.stats.kv_peak_bytes <= run.stats.kv_budget_bytes
    assert run.stats.decode_padded_positions == 0  # paged: nothing read but real positions


def test_continuous_batching_beats_static_batches_offline():
    specs = [replace(s, deadline=False) for s in _specs(400)]
    cost = CostModel(A100, LLAMA_7B)
    tokens = sum(s.output_len for s in specs)

    def throughput(policy: str) -> float:
        run = simulate(EngineConfig(scheduler_policy=policy), cost, specs, [0.0] * len(specs))
        return tokens / max(o.sent + o.e2e for o in run.outcomes)

    assert throughput("continuous") > 1.2 * throughput("fcfs_static")


def test_overload_ends_late_requests_with_deadline():
    slow = replace(A100, matmul_flops=A100.matmul_flops / 50, mem_bw=A100.mem_bw / 50)
    specs = _specs(200)
    run = simulate(EngineConfig(), CostModel(slow, LLAMA_7B), specs, [0.005 * i for i in range(len(specs))])
    errors = [o.error for o in run.outcomes if not o.ok]
    assert errors and set(errors) == {"deadline"}


def test_one_replica_is_the_same_run_whatever_the_router():
    specs = _specs(150)
    times = [0.02 * i for i in range(len(specs))]
    cost = CostModel(A100, LLAMA_7B)
    runs = [simulate(EngineConfig(), cost, specs, times, router=r) for r in ("round_robin", "least_loaded", "length")]
    assert runs[0].outcomes == runs[1].outcomes == runs[2].outcomes


@pytest.mark.parametrize("router", ["round_robin", "least_loaded", "length"])
def test_replicas_share_the_load_and_every_request_ends_once(router):
    slow = replace(A100, matmul_flops=A100.matmul_flops / 20, mem_bw=A100.mem_bw / 20)
    specs = [replace(s, deadline=False) for s in _specs(200)]
    times = [0.05 * i for i in range(len(specs))]
    cost = CostModel(slow, LLAMA_7B)
    one = simulate(EngineConfig(), cost, specs, times)
    four = simulate(EngineConfig(), cost, specs, times, replicas=4, router=router)
    assert len(four.outcomes) == len(specs) and all(o.ok for o in four.outcomes)
    assert four.stats.output_tokens == sum(s.output_len for s in specs) == one.stats.output_tokens
    assert four.stats.kv_budget_bytes == 4 * one.stats.kv_budget_bytes

    def p90_e2e(run) -> float:
        return sorted(o.e2e for o in run.outcomes)[int(0.9 * len(run.outcomes))]
    assert p90_e2e(four) < 0.8 * p90_e2e(one)  # an overloaded engine's queue, spread over four


def test_cli_writes_the_bench_report_for_each_policy(tmp_path, capsys):
    out = tmp_path / "sim"
    code = bucketserve(["simulate", "--hardware", "a100-80gb", "--model", "llama-3-8b", "--num-requests", "200",
                        "--rates", "2,4", "--sweep-seconds", "20", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["targets"]) == {"bucket", "continuous", "fcfs_static"}
    for target in results["targets"].values():
        assert target["output_tokens_per_s"] > 0 and target["offline"]["summary"]["completed"] == 200
        assert [p["rate"] for p in target["sweep"]][0] == 2.0
    assert results["environment"]["simulated"] == {"hardware": "a100-80gb", "model": "llama-3-8b", "gpus": 1,
                                                   "replicas": 1, "router": "round_robin", "split": False,
                                                   "dtype": "bfloat16"}
    assert (out / "report.md").is_file() and (out / "throughput.png").is_file()
    assert "| bucket |" in capsys.readouterr().out


def test_cli_refuses_unknown_names():
    assert bucketserve(["simulate", "--hardware", "tpu-v9", "--num-requests", "5"]) == 2
    assert bucketserve(["simulate", "--policies", "lifo", "--num-requests", "5"]) == 2
    assert bucketserve(["simulate", "--gpus", "2", "--hardware", "cpu", "--num-requests", "5"]) == 2
    assert bucketserve(["simulate", "--replicas", "0", "--num-requests", "5"]) == 2


def test_profile_round_trips(tmp_path):
    path = tmp_path / "p.json"
    A100.save(path)
    assert Hardware.load(path) == A100
    path.write_text(json.dumps({**json.loads(path.read_text()), "warp_drive": 1}))
    with pytest.raises(ValueError, match="warp_drive"):
        Hardware.load(path)


def test_calibrated_profile_predicts_the_real_executor(model_dir, tmp_path):
    """Calibrate on this machine, then simulate an offline run and run it for real in process: the
    prediction must hold within a factor the machine's noise cannot break (the measured error is in
    docs/simulation.md)."""
    from bucketserve import LLM, SamplingParams
    from bucketserve.sim.calibrate import calibrate
    from bucketserve.sim.validate import prompt_ids

    hw, steps = calibrate(str(model_dir), "here", log=lambda _m: None)
    assert hw.matmul_flops > 1e9 and hw.mem_bw > 1e8 and all(p > 0 for *_, p in steps)
    shape = ModelShape.from_config(model_dir)
    specs = [replace(s, deadline=False) for s in generate("peers", 32, 2048, 0, 0.2, DEFAULT_CLASSES)]
    config = EngineConfig()
    predicted = simulate(config, CostModel(hw, shape), specs, [0.0] * len(specs))
    predicted_s = max(o.sent + o.e2e for o in predicted.outcomes)
    with LLM(str(model_dir)) as llm:
        prompts = [{"prompt_token_ids": prompt_ids(i, s.prompt_len, shape.vocab)} for i, s in enumerate(specs)]
        params = [SamplingParams(max_tokens=s.output_len, temperature=0, ignore_eos=True) for s in specs]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # first forwards pay one-off costs
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        measured_s = time.perf_counter() - start
    assert 0.5 < predicted_s / measured_s < 2.0, (predicted_s, measured_s)


def test_the_cpu_profile_simulates_the_default_model_unless_told_otherwise(model_dir, tmp_path, monkeypatch):
    from bucketserve.sim import cli

    monkeypatch.setattr(cli, "_checkpoint", lambda model: str(model_dir) if model is None else model)
    out = tmp_path / "cpu"
    assert bucketserve(["simulate", "--hardware", "cpu", "--workload", "peers", "--num-requests", "8",
                        "--policies", "continuous", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["environment"]["simulated"]["model"] == str(model_dir)


def test_validate_repeats_the_real_run_and_reports_its_spread(model_dir, tmp_path, monkeypatch, capsys):
    from bucketserve.sim import cli

    monkeypatch.setattr(cli, "_checkpoint", lambda model: str(model_dir) if model is None else model)
    out = tmp_path / "v"
    assert bucketserve(["simulate", "validate", "--workload", "peers", "--num-requests", "4", "--policies",
                        "continuous", "--repeats", "3", "--out", str(out)]) == 0
    real = json.loads((out / "results.json").read_text())["targets"]["continuous real"]
    runs = [r["output_tokens_per_s"] for r in real["offline_runs"]]
    assert len(runs) == 3 and runs == sorted(runs)
    assert real["offline"]["summary"]["output_tokens_per_s"] == runs[1]  # the median run is the one compared
    table = capsys.readouterr().out.split("Simulated against the real engine")[1]
    assert "| continuous | offline output tok/s |" in table and f"{runs[0]:,.1f}-{runs[2]:,.1f}" in table
    assert bucketserve(["simulate", "validate", "--repeats", "0", "--num-requests", "4"]) == 2


def test_fit_recovers_the_efficiencies_behind_vidur_style_operator_times(tmp_path, capsys):
    """Times written in Vidur's mlp.csv layout from known efficiencies come back as those efficiencies."""
    from bucketserve.sim.vidur import ELEMENTWISE, MATMULS, Row, elementwise_bytes, fit, matmul_s, read

    peak, hbm, compute, memory, latency, floor = 312e12, 2039e9, 0.7, 0.8, 8e-6, 30e-6
    header = [f"time_stats.{op}.median" for op in [*MATMULS, *ELEMENTWISE]]
    lines = [",".join(header + ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens",
                                "num_tensor_parallel_workers"])]
    for tp in (1, 2, 4):
        for tokens in (1, 8, 64, 256, 512, 1024, 2048, 4096):
            row = Row(tokens, tp, 4096, 11008, 32, 32, {})
            weights = row.weights()
            times = [float(matmul_s(tokens, weights[op], peak, hbm, compute, memory, latency, 2)) for op in MATMULS.values()]
            # elementwise: the traffic at 0.4 of HBM plus the floor, spread over six kernels (add runs twice)
            share = (elementwise_bytes(row, 2) / (hbm * 0.4) + floor) / 6
            times += [share] * len(ELEMENTWISE)
            lines.append(",".join([f"{t * 1e3:.9f}" for t in times] + ["32", "32", "4096", "11008", str(tokens), str(tp)]))
    path = tmp_path / "mlp.csv"
    path.write_text("\n".join(lines) + "\n")
    f = fit(read(path), peak, hbm)
    assert abs(f.matmul - compute) <= 0.01 and abs(f.memory - memory) <= 0.01
    assert abs(f.matmul_latency_s - latency) <= 1e-6
    assert f.errors["qkv"][1] < 0.02
    assert 0.35 < f.elementwise < 0.45 and f.layer_overhead_s > 4 * latency
    # the command prints the same fit, with its errors; it needs a GPU preset and at least one profile
    assert bucketserve(["simulate", "fit", "--hardware", "a100-80gb", "--vidur", str(path)]) == 0
    out = capsys.readouterr().out
    assert "matmul 0.700 of peak, memory 0.800" in out and "| qkv |" in out
    assert bucketserve(["simulate", "fit", "--hardware", "cpu", "--vidur", str(path)]) == 2
    assert bucketserve(["simulate", "fit", "--hardware", "a100-80gb"]) == 2
