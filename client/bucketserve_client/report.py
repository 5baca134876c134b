"""A benchmark's results as ``results.json``, a markdown table and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bucketserve_client import provenance
from bucketserve_client.stats import CAPACITY_ATTAINMENT

PLOTS = ("slo_attainment.png", "throughput.png", "latency_cdf.png", "buckets.png")


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.0f}"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(results: dict[str, Any]) -> str:
    targets = results["targets"]
    lines = [provenance.markdown(results["environment"]), ""] if "environment" in results else []
    for label, t in targets.items():
        if t.get("server"):
            lines += [f"{label}: " + ", ".join(f"{k}={v}" for k, v in t["server"].items()), ""]
    lines += [f"Workload: {results['workload']['description']}", ""]
    if any(t.get("offline") for t in targets.values()):
        lines += ["Offline (all requests at t = 0):", "",
                  "| target | output tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 ms | e2e p50 / p99 ms "
                  "| prefill padding | decode padding | prefill batches |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, t in targets.items():
            o = t.get("offline")
            if not o:
                continue
            lat, server = o["summary"]["latency_ms"], o["server"]
            batches = f"{server['prefill_batches']:.0f}" if server else "-"
            lines.append(
                f"| {label} | {o['summary']['output_tokens_per_s']:,.0f} | {o['summary']['requests_per_s']:.2f} | "
                f"{_ms(lat['ttft']['p50'])} / {_ms(lat['ttft']['p99'])} | {_ms(lat['tpot']['p50'])} | "
                f"{_ms(lat['e2e']['p50'])} / {_ms(lat['e2e']['p99'])} | {_share(server.get('prefill_padding'))} | "
                f"{_share(server.get('decode_padding'))} | {batches} |")
        lines.append("")
    rates = sorted({p["rate"] for t in targets.values() for p in t.get("sweep", [])})
    if rates:
        lines += [f"SLO attainment by offered rate ({results['sweep']['arrival']} arrivals, "
                  f"{results['sweep']['seconds']:g} s of arrivals per rate; classes: {results['classes_text']}):", "",
                  "| target | " + " | ".join(f"{r:g} req/s" for r in rates) + f" | capacity at {CAPACITY_ATTAINMENT:.0%} |",
                  "|---|" + "---|" * (len(rates) + 1)]
        for label, t in targets.items():
            by_rate = {p["rate"]: p["summary"]["slo_attainment"] for p in t.get("sweep", [])}
            cap = t.get("capacity_rps")
            cap_text = "below the lowest rate" if cap is None else f"{'>= ' if t['capacity_censored'] else ''}{cap:.2f} req/s"
            lines.append(f"| {label} | " + " | ".join(_share(by_rate.get(r)) for r in rates) + f" | {cap_text} |")
        lines.append("")
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several bench runs of the same workload (say, each server measured alone, in turn):
    their targets side by side, each keeping the environment it was measured in."""
    first = runs[0]
    merged = {**first, "targets": {}}
    for run in runs:
        if (run["workload"], run["sweep"], run["classes"]) != (first["workload"], first["sweep"], first["classes"]):
            raise ValueError("runs of different workloads, sweeps or classes cannot share a report")
        for label, target in run["targets"].items():
            while label in merged["targets"]:
                label += "'"
            merged["targets"][label] = {**target, "environment": run.get("environment")}
    rates = first["sweep"]["rates"]
    good = [r for r in rates if all(any(p["rate"] == r and p["summary"]["slo_attainment"] >= CAPACITY_ATTAINMENT
                                        for p in t["sweep"]) for t in merged["targets"].values())]
    merged["cdf_rate"] = (max(good) if good else min(rates)) if rates else None
    return merged


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Write everything into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    # one line: every request's outcome is in it, and a sweep to overload runs past a megabyte indented
    (out / "results.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
    (out / "report.md").write_text(markdown(results))
    return [out / "results.json", out / "report.md", *plot(results, out)]


def _cdf(ax: Any, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, t in targets.items():
        pts = sorted((p["rate"], p["summary"]["slo_attainment"]) for p in t.get("sweep", []))
        if pts:
            ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=label)
    ax.axhline(CAPACITY_ATTAINMENT * 100, color="grey", linestyle="--", label=f"{CAPACITY_ATTAINMENT:.0%} SLO attainment")
    ax.set(xlabel="offered request rate (req/s)", ylabel="SLO attainment (%)", ylim=(-2, 102),
           title="SLO attainment vs offered rate")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "slo_attainment.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [label for label, t in targets.items() if t.get("offline")]
    left.bar(labels, [targets[label]["offline"]["summary"]["output_tokens_per_s"] for label in labels],
             color=[f"C{i}" for i in range(len(labels))])
    left.set(ylabel="output tokens/s", title="Offline throughput")
    left.tick_params(axis="x", rotation=15)
    for label, t in targets.items():
        pts = sorted((p["rate"], p["summary"]["requests_per_s"]) for p in t.get("sweep", []))
        if pts:
            right.plot([r for r, _ in pts], [x for _, x in pts], marker="o", label=label)
    top = max([p["rate"] for t in targets.values() for p in t.get("sweep", [])], default=1)
    right.plot([0, top], [0, top], color="grey", linestyle="--", label="processed = offered")
    right.set(xlabel="offered request rate (req/s)", ylabel="processed request rate (req/s)", title="Processed vs offered")
    right.legend()
    right.grid(alpha=0.3)
    written.append(_save(fig, out / "throughput.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    rate = results.get("cdf_rate")
    for label, t in targets.items():
        run = next((p for p in t.get("sweep", []) if p["rate"] == rate), t.get("offline"))
        if run:
            done = [o for o in run["outcomes"] if o["error"] is None and o["e2e"] is not None]
            _cdf(axes[0], [o["ttft"] for o in done if o["ttft"] is not None], label)
            _cdf(axes[1], [o["e2e"] for o in done], label)
    where = f"at {rate:g} req/s offered" if rate is not None else "offline"
    axes[0].set(xlabel="time to first token (s)", ylabel="share of requests", title=f"TTFT CDF {where}")
    axes[1].set(xlabel="end-to-end latency (s)", ylabel="share of requests", title=f"E2E latency CDF {where}")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    written.append(_save(fig, out / "latency_cdf.png"))

    sampled = [(label, t["offline"]["samples"]) for label, t in targets.items()
               if t.get("offline") and t["offline"].get("samples")]
    fig, axes = plt.subplots(len(sampled) or 1, 1, figsize=(9, 3.2 * max(1, len(sampled))), squeeze=False)
    for ax, (label, samples) in zip(axes[:, 0], sampled):
        bounds = [(s["t"], up) for s in samples for _, up in s["buckets"]]
        ax.scatter([t for t, _ in bounds], [up for _, up in bounds], marker="_", s=60, color="C0",
                   label="bucket upper bounds")
        ax.set(ylabel="prompt length (tokens)", ylim=(0, 1.05 * max([up for _, up in bounds], default=1)),
               title=f"{label}: buckets and N_max over the offline run")
        twin = ax.twinx()
        twin.step([s["t"] for s in samples], [s["n_max"] for s in samples], where="post", color="C1", label="N_max")
        twin.step([s["t"] for s in samples], [s["queue"] for s in samples], where="post", color="C2",
                  label="waiting requests")
        twin.set_ylabel("requests")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    axes[-1, 0].set_xlabel("seconds into the run")
    written.append(_save(fig, out / "buckets.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
