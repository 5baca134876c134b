"""``bucketserve simulate``: the bench's workloads through the engine's scheduler in simulated time, on a
hardware profile and a model shape, for each policy; the same results.json, report and plots as
``bucketserve-client bench`` (one report module serves both). ``simulate calibrate`` writes this machine's
profile; ``simulate validate`` runs the same requests on the real engine in process beside each simulation
and reports the simulator's error."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from bucketserve.config import ConfigError, EngineConfig, parse_param
from bucketserve.engine.policy import POLICIES
from bucketserve.sim.cost import CostModel
from bucketserve.sim.hardware import PRESETS as HARDWARE
from bucketserve.sim.hardware import hardware
from bucketserve.sim.runner import ROUTERS, figures, simulate, simulate_split
from bucketserve.sim.shape import PRESETS as MODELS
from bucketserve.sim.shape import model_shape


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("simulate", help="the scheduler in simulated time on a hardware profile (GPU presets or this "
                                        "CPU); `simulate calibrate` writes this machine's profile",
                       description=__doc__)
    s.add_argument("action", nargs="?", choices=("run", "calibrate", "validate", "fit"), default="run",
                   help="run (default) a simulation; calibrate: time the real executor on this machine and write "
                        "its profile to --out; validate: each run also on the real engine here, with the error; "
                        "fit: a GPU's efficiencies from Vidur's operator profiles (--vidur)")
    s.add_argument("--vidur", action="append", type=Path, default=[], metavar="MLP_CSV",
                   help="fit: one of Vidur's data/profiling/compute/<gpu>/<model>/mlp.csv (repeatable), timed on the "
                        "--hardware preset's GPU")
    add_arguments(s)
    s.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bucketserve_client.arrivals import ARRIVALS
    from bucketserve_client.workload import WORKLOADS

    p.add_argument("--hardware", default=None,
                   help=f"a preset ({', '.join(HARDWARE)}), cpu (this project's calibrated 2-core profile), "
                        "or a profile JSON from `bucketserve simulate calibrate` (default a100-40gb; validate: cpu)")
    p.add_argument("--model", default=None,
                   help=f"a preset ({', '.join(MODELS)}) or a checkpoint directory / config.json (default "
                        "llama-2-13b; with --hardware cpu, calibrate and validate: the default model)")
    p.add_argument("--gpus", type=int, default=1, help="devices each replica's model is split over (tensor parallel)")
    p.add_argument("--split", action="store_true",
                   help="prefill and decode on separate devices, --gpus each (DistServe's layout and the paper's): "
                        "the policy forms prefill batches, decode runs continuous batching, KV moves over the link")
    p.add_argument("--replicas", type=int, default=1, help="engines behind the router, each on --gpus devices")
    p.add_argument("--router", choices=ROUTERS, default="round_robin",
                   help="how requests are spread over replicas: round_robin, least_loaded (fewest requests "
                        "waiting or running), length (each replica a range of prompt lengths, least loaded "
                        "when one falls behind)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated scheduling policies")
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    p.add_argument("--num-requests", type=int, default=1000, help="requests in the offline run")
    p.add_argument("--long-share", type=float, default=0.2, help="LongBench share of the mixed workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=0, help="context (default: the model's)")
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME:SHARE:TTFT_MS:E2E_MS",
                   help="a priority class and its SLOs (repeatable), as in bucketserve-client bench")
    p.add_argument("--no-offline", dest="offline", action="store_false", help="skip the offline run")
    p.add_argument("--rates", default="", help="comma-separated offered rates (req/s) for the SLO sweep")
    p.add_argument("--arrival", choices=[a for a in ARRIVALS if a != "offline"], default="poisson")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma inter-arrival gaps")
    p.add_argument("--sweep-seconds", type=float, default=60.0, help="seconds of arrivals per sweep rate")
    p.add_argument("--repeats", type=int, default=3,
                   help="validate: runs of the real engine's offline run per policy; the median run (by output "
                        "tokens/s) is compared, and the error table gives the spread of all (this machine's "
                        "runs of the same work differ by 5-25%%)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine parameter, as `bucketserve serve --param` (e.g. max_num_seqs=256; executor=hf "
                        "for padded caches and prefill)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json, report.md and PNG plots here (calibrate: the profile JSON to write)")


Runner = Callable[[list, list[float], Callable[[int], None]], tuple[list, dict[str, float]]]
"""Runs requests arriving at given times; returns their outcomes and the engine's figures."""


def simulator(config: EngineConfig, cost: CostModel, replicas: int = 1, router: str = "round_robin",
              split: bool = False) -> Runner:
    def run(specs: list, times: list[float], on_finish: Callable[[int], None]) -> tuple[list, dict[str, float]]:
        sim = simulate_split(config, cost, specs, times, on_finish) if split else \
            simulate(config, cost, specs, times, on_finish, replicas, router)
        end = max((o.sent + (o.e2e or 0) for o in sim.outcomes), default=0.0)
        return sim.outcomes, figures(sim.stats, sim.forward_seconds, end)
    return run


def run_policy(label: str, runner: Runner, offline: list, pool: list, args: argparse.Namespace,
               rates: list[float], repeats: int = 1) -> dict[str, Any]:
    """One policy's offline run and SLO sweep, laid out as one target of a bench report. With ``repeats`` > 1
    the offline run is run that often and the median by output tokens/s kept; ``offline_runs`` has every
    run's summary."""
    from bucketserve_client.arrivals import arrival_times
    from bucketserve_client.bench import conclude, run_json, sweep_specs
    from bucketserve_client.loadgen import RunRecord, progress
    from bucketserve_client.stats import CAPACITY_ATTAINMENT

    def one(specs: list, times: list[float], offered: float | None) -> dict[str, Any]:
        bar = progress(f"{label} {'offline' if offered is None else f'{offered:g} req/s'}", len(specs))
        outcomes, server = runner(specs, times, bar.update)
        bar.close()
        return run_json(RunRecord(outcomes, [], server), offered)

    result: dict[str, Any] = {"offline": None, "sweep": []}
    if args.offline:
        specs = [replace(s, deadline=False) for s in offline]
        runs = sorted((one(specs, arrival_times("offline", len(specs)), None) for _ in range(repeats)),
                      key=lambda r: r["summary"]["output_tokens_per_s"])
        result["offline"] = runs[len(runs) // 2]
        if repeats > 1:
            result["offline_runs"] = [r["summary"] for r in runs]
    for rate in rates:
        sweep = sweep_specs(pool, rate, args.sweep_seconds)
        result["sweep"].append({"rate": rate, **one(sweep, arrival_times(args.arrival, len(sweep), rate, args.seed, args.cv),
                                                    rate)})
        if result["sweep"][-1]["summary"]["slo_attainment"] < CAPACITY_ATTAINMENT:
            break
    return conclude(result, rates)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bucketserve_client import provenance, report
    from bucketserve_client.bench import classes_text, describe, sweep_size
    from bucketserve_client.workload import DEFAULT_CLASSES, PriorityClass, generate

    validating = args.action == "validate"
    checkpoint = _checkpoint(args.model) if validating else None
    hw = hardware(args.hardware or ("cpu" if validating else "a100-40gb"))
    # the CPU profile was calibrated on the default model: a 13B model on two cores is not what anyone means
    default_model = _checkpoint(None) if args.hardware == "cpu" else "llama-2-13b"
    shape = model_shape(checkpoint or args.model or default_model)
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: at least 1")
    if args.replicas < 1 or (args.replicas > 1 and (validating or args.split)):
        raise ValueError(f"--replicas {args.replicas}: at least 1; validate and --split run one engine")
    if args.split and (validating or not hw.link_bw):
        raise ValueError(f"--split needs a device link ({hw.name} has none in its profile) and is not validated")
    if args.gpus < 1 or (args.gpus > 1 and not hw.link_bw):
        raise ValueError(f"--gpus {args.gpus}: {hw.name} has no device link in its profile" if args.gpus > 1
                         else "--gpus must be >= 1")
    cost = CostModel(hw, shape, args.gpus)
    params = dict(parse_param(p) for p in args.param)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(policies) - set(POLICIES)
    if unknown or not policies:
        raise ValueError(f"--policies: unknown {sorted(unknown)}; known {', '.join(POLICIES)}")
    classes = tuple(PriorityClass.parse(c) for c in args.classes) or DEFAULT_CLASSES
    max_len = args.max_model_len or shape.max_len
    rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    size = max([args.num_requests, *(sweep_size(r, args.sweep_seconds) for r in rates)])
    specs = generate(args.workload, size, max_len, args.seed, args.long_share, classes)
    offline = specs[:args.num_requests]
    environment = {**provenance.machine(), "simulated": {"hardware": hw.name, "model": shape.name, "gpus": args.gpus,
                                                          "replicas": args.replicas, "router": args.router,
                                                          "split": args.split, "dtype": hw.dtype}}
    results: dict[str, Any] = {
        "environment": environment,
        "workload": {"name": args.workload, "description": describe(args.workload, offline, classes),
                     "requests": len(offline), "seed": args.seed, "max_model_len": max_len},
        "classes": [c.__dict__ for c in classes], "classes_text": classes_text(classes),
        "sweep": {"rates": rates, "arrival": args.arrival, "cv": args.cv, "seconds": args.sweep_seconds},
        "targets": {},
    }
    real = _load(checkpoint, params) if checkpoint else None
    if real:
        from bucketserve.sim.validate import run_real

        run_real(real, EngineConfig.from_parameters(params), offline[:4], [0.0] * 4)  # first forwards pay one-off costs
    for policy in policies:
        config = EngineConfig.from_parameters({**params, "scheduler_policy": policy, "max_model_len": str(max_len)})
        server = {"executor": "simulated", "hardware": hw.name, "model": shape.name, "gpus": args.gpus,
                  "replicas": args.replicas, "router": args.router, "split": args.split, "policy": policy,
                  **params}
        label = f"{policy} simulated" if real else policy
        results["targets"][label] = {"url": f"sim://{hw.name}/{shape.name}/{policy}", "server": server,
                                     **run_policy(label, simulator(config, cost, args.replicas, args.router, args.split),
                                                  offline, specs, args, rates)}
        if real:
            def on_engine(specs_: list, times: list[float], on_finish: Callable[[int], None], config=config):
                return run_real(real, config, specs_, times, on_finish)
            results["targets"][f"{policy} real"] = {
                "url": f"inprocess://{checkpoint}/{policy}", "server": {**server, "executor": real.info()},
                **run_policy(f"{policy} real", on_engine, offline, specs, args, rates, args.repeats)}
    return report.merge([results])


def _checkpoint(model: str | None) -> str:
    """The checkpoint to time or run for real: a directory, or the default model."""
    from bucketserve.tools.model_builder import ensure_default_model

    if model is None or model in MODELS:
        return str(ensure_default_model(lambda m: print(m, file=sys.stderr)))
    return model


def _load(checkpoint: str, params: dict[str, str]) -> Any:
    from bucketserve.factory import load_model

    return load_model(EngineConfig.from_parameters(params), checkpoint, log=lambda m: print(f"[validate] {m}", file=sys.stderr))


def errors(results: dict[str, Any]) -> str:
    """Simulated against real, per policy: offline tokens/s, TTFT p50 and p90, capacity; the error of each, and
    where the real offline run was repeated, the range of its runs (the real figure is the median run's)."""
    lines = ["| policy | figure | simulated | real | real, every run | error |", "|---|---|---|---|---|---|"]
    targets = results["targets"]
    offline_figures = {"offline output tok/s": lambda s: s["output_tokens_per_s"],
                       "offline TTFT p50 ms": lambda s: s["latency_ms"]["ttft"]["p50"],
                       "offline TTFT p90 ms": lambda s: s["latency_ms"]["ttft"]["p90"]}
    for label in targets:
        if not label.endswith(" simulated"):
            continue
        policy = label.removesuffix(" simulated")
        sim, real = targets[label], targets.get(f"{policy} real")
        if real is None:
            continue
        rows = []
        if sim["offline"] and real["offline"]:
            for name, get in offline_figures.items():
                spread = sorted(get(r) for r in real.get("offline_runs", []))
                rows.append((name, get(sim["offline"]["summary"]), get(real["offline"]["summary"]),
                             f"{spread[0]:,.1f}-{spread[-1]:,.1f}" if len(spread) > 1 else "-"))
        for s_pt, r_pt in zip(sim["sweep"], real["sweep"]):
            rows.append((f"SLO attainment at {s_pt['rate']:g} req/s", s_pt["summary"]["slo_attainment"],
                         r_pt["summary"]["slo_attainment"], "-"))
        if sim["capacity_rps"] is not None or real["capacity_rps"] is not None:
            rows.append(("capacity at 80% req/s" + (" (censored)" if sim["capacity_censored"] or real["capacity_censored"] else ""),
                         sim["capacity_rps"], real["capacity_rps"], "-"))
        for name, s_val, r_val, spread in rows:
            err = f"{s_val / r_val - 1:+.1%}" if s_val is not None and r_val else "-"
            fmt = (lambda v: "-" if v is None else f"{v:.1%}") if "attainment" in name else \
                (lambda v: "-" if v is None else f"{v:,.1f}")
            lines.append(f"| {policy} | {name} | {fmt(s_val)} | {fmt(r_val)} | {spread} | {err} |")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace) -> int:
    from bucketserve.sim.calibrate import calibrate

    if args.out is None:
        print("[calibrate] ERROR: --out PROFILE.json is required", file=sys.stderr)
        return 2
    model = _checkpoint(args.model)  # a preset has no weights to time: the default model then
    hw, steps = calibrate(model, args.out.stem, log=lambda m: print(m, file=sys.stderr, flush=True))
    print("| step | lengths | measured ms | model ms |\n|---|---|---|---|")
    for kind, lengths, measured, predicted in steps:
        print(f"| {kind} | {len(lengths)} x {lengths[0]} | {measured * 1e3:.2f} | {predicted * 1e3:.2f} |")
    hw.save(args.out)
    print(f"[calibrate] wrote {args.out}", file=sys.stderr)
    return 0


def _fit(args: argparse.Namespace) -> int:
    from bucketserve.sim.hardware import SPECS
    from bucketserve.sim.vidur import fit, read

    spec = SPECS.get(args.hardware or "")
    if spec is None or not args.vidur:
        print(f"[fit] ERROR: needs --hardware (one of {', '.join(SPECS)}) and --vidur MLP_CSV", file=sys.stderr)
        return 2
    rows = [row for path in args.vidur for row in read(path)]
    f = fit(rows, spec.peak_flops, spec.hbm_bw)
    print(f"{len(rows)} timed configurations on {args.hardware}: matmul {f.matmul:.3f} of peak, memory {f.memory:.3f} "
          f"and elementwise {f.elementwise:.3f} of HBM, {f.matmul_latency_s * 1e6:.1f} us per matmul and "
          f"{f.elementwise_floor_s * 1e6:.1f} us of elementwise floor: {f.layer_overhead_s * 1e6:.1f} us per layer\n")
    print("| operator | median error | p90 error |\n|---|---|---|")
    for op, (median, p90) in f.errors.items():
        print(f"| {op} | {median:.1%} | {p90:.1%} |")
    return 0


def main(args: argparse.Namespace) -> int:
    from bucketserve_client import report

    if args.action == "calibrate":
        return _calibrate(args)
    if args.action == "fit":
        return _fit(args)
    try:
        results = run(args)
    except (ValueError, ConfigError, OSError) as e:
        print(f"[simulate] ERROR: {e}", file=sys.stderr)
        return 2
    print(report.markdown(results))
    if args.action == "validate":
        print("\nSimulated against the real engine (error = simulated / real - 1):\n\n" + errors(results))
    if args.out:
        for path in report.write(results, args.out):
            print(f"[simulate] wrote {path}", file=sys.stderr)
    return 0
