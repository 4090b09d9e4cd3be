"""Benchmark partc's horizontal-cut solver: solve time vs graph size, plan families, baselines.

Run from the repository root::

    python benchmarks/cut_solver.py            # everything (a few minutes on 2 cores)
    python benchmarks/cut_solver.py --quick    # synthetic graphs only (a minute or two)

Graphs: four torchvision DAGs traced with torch.fx (resnet50, googlenet, inception_v3 at
299x299, densenet121), with a FLOP-proportional profile (device 2 GFLOP/s, edge 20, cloud
200, plus a per-op overhead), and synthetic DAGs of 100 to 10,000 nodes (each node reads
one to three of the 30 nodes before it: long skips, many multi-consumer tensors; a 602 kB
input, outputs shrinking with depth like a CNN's, about 10 GFLOP in all).

For each graph it times: one exact three-tier latency plan (``solve``, graph built from
scratch; CPU seconds, median of 5), a re-solve at new bandwidths on a built graph (``LayeredCut.solve``), a plan
family over 0.8 Mbit/s .. 8 Gbit/s on one link and on both links, all baselines, and the
exact throughput MILP (up to 500 nodes). It then compares partc with every baseline on a
bandwidth grid for the real models and draws latency-vs-bandwidth plots.

Writes ``benchmarks/results/cut_solver.md``, ``cut_solver.json`` and
``cut_solver_<model>.png`` (``--quick`` rewrites the first two without the models).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from partc.context import CompileContext, Link, Tier
from partc.draw import plot_bandwidth_sweep
from partc.ir import META_FLOPS, META_PROFILE
from partc.partition.baselines import baselines
from partc.partition.cost import CostGraph
from partc.partition.family import bandwidth_sweep, plan_family
from partc.partition.model import cost_graph
from partc.partition.solve import LayeredCut, solve
from partc.trace import load_model, parse_input_spec, trace

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "resnet50": "1,3,224,224",
    "googlenet": "1,3,224,224",
    "inception_v3": "1,3,299,299",
    "densenet121": "1,3,224,224",
}
SPEEDS = {"device": 2e9, "edge": 2e10, "cloud": 2e11}  # FLOP/s
OVERHEAD = {"device": 2e-5, "edge": 1e-5, "cloud": 5e-6}  # seconds per op
UP, BACK = 20e6 / 8, 50e6 / 8  # bytes/s: 20 Mbit/s device->edge, 50 Mbit/s edge->cloud
RANGE = (1e5, 1e9)  # bytes/s: 0.8 Mbit/s .. 8 Gbit/s
SIZES = (100, 300, 1000, 3000, 10000)


def cluster() -> CompileContext:
    return CompileContext(
        tiers=tuple(Tier(t, "cpu", "torchscript") for t in SPEEDS),
        links=(Link("device", "edge", UP, 0.005), Link("edge", "cloud", BACK, 0.03)),
    )


def model_graph(name: str) -> CostGraph:
    gm = trace(load_model(f"torchvision:{name}"), [parse_input_spec(MODELS[name])])
    for node in gm.graph.nodes:
        flops = 0 if node.op in ("placeholder", "output") else node.meta[META_FLOPS]
        extra = 0 if node.op in ("placeholder", "output") else 1
        node.meta[META_PROFILE] = {t: flops / SPEEDS[t] + extra * OVERHEAD[t] for t in SPEEDS}
    return cost_graph(gm, cluster())


def synthetic_graph(n: int, seed: int = 0) -> CostGraph:
    rng = np.random.default_rng(seed)
    edges = {(0, 1)}
    for v in range(2, n):
        for u in rng.choice(np.arange(max(0, v - 30), v), size=min(v, int(rng.integers(1, 4))), replace=False):
            edges.add((int(u), v))
    flops = rng.lognormal(15, 1.5, n) * 1000 / n
    compute = np.column_stack([flops / s + OVERHEAD[t] for t, s in SPEEDS.items()])
    compute[0] = 0
    nbytes = (600e3 * np.exp(-5 * np.arange(n) / n) * rng.lognormal(0, 1, n)).astype(np.int64)
    nbytes[0] = 602_112
    return CostGraph(
        names=tuple(f"n{v}" for v in range(n)),
        tiers=tuple(SPEEDS),
        compute=compute,
        nbytes=nbytes,
        memory=nbytes,
        edges=np.array(sorted(edges), dtype=np.int64),
        inputs=np.arange(n) == 0,
        latency=np.array([0.005, 0.03]),
        bandwidth=np.array([UP, BACK]),
        allowed=np.vstack([[True, False, False], np.ones((n - 1, 3), dtype=bool)]),
        max_link_bytes=np.full(2, np.inf),
        max_memory=np.full(3, np.inf),
    )


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median CPU seconds of this process over ``repeat`` calls (robust to other jobs on the host)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def measure(name: str, graph: CostGraph, throughput: bool) -> dict:
    n = len(graph.names)
    repeat = 5 if n <= 3000 else 2
    row = {"graph": name, "nodes": n, "edges": int(len(graph.edges))}
    row["solve_s"], plan = timed(lambda: solve(graph), repeat)
    row["latency_ms"] = plan.cost.latency * 1e3
    row["gap_s"] = plan.gap
    cut = LayeredCut(graph)
    row["resolve_s"], _ = timed(lambda: cut.solve(graph.bandwidth * 0.5), repeat)
    row["family1_s"], fam1 = timed(lambda: plan_family(graph, {0: RANGE}), 1)
    row["family1_plans"], row["family1_solves"] = len(fam1.plans), fam1.solves
    if n <= 3000:
        row["family2_s"], fam2 = timed(lambda: plan_family(graph, {0: RANGE, 1: RANGE}), 1)
        row["family2_plans"], row["family2_solves"] = len(fam2.plans), fam2.solves
    if n <= 3000:  # scission enumerates n^2 / 2 cut pairs
        row["baselines_s"], found = timed(lambda: baselines(graph), 1)
        row["best_baseline_ms"] = min(p.cost.latency for p in found.values() if p is not None) * 1e3
    if throughput:
        row["throughput_s"], tp = timed(lambda: solve(graph, "throughput", time_limit=120), 1)
        row["bottleneck_ms"], row["throughput_gap_s"] = tp.cost.bottleneck * 1e3, tp.gap
    print(
        f"{name:>14} {n:6d} nodes  solve {row['solve_s'] * 1e3:7.1f} ms  re-solve {row['resolve_s'] * 1e3:6.1f} ms  "
        f"family(1 link) {row['family1_s']:.2f} s/{row['family1_plans']} plans  "
        + (f"family(2 links) {row['family2_s']:.2f} s/{row['family2_plans']} plans" if "family2_s" in row else "")
        + (f"  baselines {row['baselines_s']:.2f} s" if "baselines_s" in row else "")
        + (f"  throughput MILP {row['throughput_s']:.1f} s" if throughput else ""),
        flush=True,
    )
    return row


def compare(name: str, graph: CostGraph) -> list[dict]:
    rows = []
    grid = np.geomspace(1e5, 1e8, 4)
    for up, back in itertools.product(grid, grid):
        at = graph.with_bandwidth([up, back])
        plan = solve(at)
        found = baselines(at)
        rows.append(
            {
                "graph": name,
                "up_mbit": up * 8 / 1e6,
                "back_mbit": back * 8 / 1e6,
                "partc_ms": plan.cost.latency * 1e3,
                "partc_tiers": np.bincount(plan.tiers, minlength=3).tolist(),
                **{f"{k}_ms": (None if p is None else p.cost.latency * 1e3) for k, p in found.items()},
            }
        )
    return rows


def write_markdown(timing: list[dict], comparison: list[dict], load: tuple[float, ...], path: Path) -> None:
    lines = [
        "# Horizontal-cut solver benchmark",
        "",
        "Generated by `python benchmarks/cut_solver.py`. Times are medians of CPU seconds of the",
        "benchmark process (wall-clock time was inflated by other jobs sharing the machine).",
        "Profile: FLOP-proportional (device 2, edge 20, cloud 200 GFLOP/s + per-op overhead);",
        "links 20 Mbit/s + 5 ms and 50 Mbit/s + 30 ms; plan families over 0.8 Mbit/s .. 8 Gbit/s.",
        f"{os.cpu_count()} CPUs; load average before/after the run: {load[0]:.1f} / {os.getloadavg()[0]:.1f}.",
        "",
        "## Solve time vs graph size",
        "",
        "| graph | nodes | edges | solve (ms) | re-solve (ms) | family 1 link (s) | plans | solves "
        "| family 2 links (s) | plans | solves | baselines (s) | throughput MILP (s) | MILP gap (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns = [
        ("nodes", "d", 1),
        ("edges", "d", 1),
        ("solve_s", ".1f", 1e3),
        ("resolve_s", ".1f", 1e3),
        ("family1_s", ".2f", 1),
        ("family1_plans", "d", 1),
        ("family1_solves", "d", 1),
        ("family2_s", ".2f", 1),
        ("family2_plans", "d", 1),
        ("family2_solves", "d", 1),
        ("baselines_s", ".2f", 1),
        ("throughput_s", ".1f", 1),
        ("throughput_gap_s", ".2g", 1),
    ]
    for r in timing:
        cells = [
            "-" if key not in r else format(r[key] * scale if scale != 1 else r[key], spec)
            for key, spec, scale in columns
        ]
        lines.append(f"| {r['graph']} | " + " | ".join(cells) + " |")
    if comparison:
        names = [k[:-3] for k in comparison[0] if k.endswith("_ms") and k != "partc_ms"]
        lines += [
            "",
            "## partc vs baselines (predicted latency, ms) on a bandwidth grid",
            "",
            "| graph | up (Mbit/s) | back (Mbit/s) | partc | tiers (d/e/c) | " + " | ".join(names) + " |",
            "|---|---|---|---|---|" + "---|" * len(names),
        ]
        for r in comparison:
            cells = " | ".join("-" if r[f"{k}_ms"] is None else f"{r[f'{k}_ms']:.1f}" for k in names)
            tiers = "/".join(map(str, r["partc_tiers"]))
            head = f"| {r['graph']} | {r['up_mbit']:.3g} | {r['back_mbit']:.3g} | {r['partc_ms']:.1f}"
            lines.append(f"{head} | {tiers} | {cells} |")
        worse = sum(
            r["partc_ms"] > v + 1e-9 for r in comparison for k, v in r.items() if k.endswith("_ms") and v is not None
        )
        strict = sum(r["partc_ms"] < 0.999 * min(v for k, v in r.items() if _baseline(k, v)) for r in comparison)
        chain = sum(
            r["partc_ms"] < 0.999 * min(v for k, v in r.items() if _baseline(k, v) and k != "dads_ms")
            for r in comparison
        )
        lines += [
            "",
            f"Cells: {len(comparison)}. A baseline beats partc in {worse}. partc is more than 0.1% faster than every",
            f"baseline in {strict}, and than every chain or single-tier baseline (all but dads) in {chain}.",
        ]
    path.write_text("\n".join(lines) + "\n")


def _baseline(key: str, value) -> bool:
    return key.endswith("_ms") and key != "partc_ms" and value is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic graphs only (a minute or two)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    timing, comparison = [], []
    if not args.quick:
        for name in MODELS:
            graph = model_graph(name)
            timing.append(measure(name, graph, throughput=True))
            comparison += compare(name, graph)
            bandwidths = np.geomspace(1e5, 1e8, 25)
            series = bandwidth_sweep(graph, 0, bandwidths)
            plot_bandwidth_sweep(
                series,
                bandwidths,
                RESULTS / f"cut_solver_{name}.png",
                title=f"{name}: latency vs device->edge bandwidth (edge->cloud {BACK * 8 / 1e6:.0f} Mbit/s)",
            )
    for n in SIZES:
        graph = synthetic_graph(n)
        timing.append(measure(f"synthetic-{n}", graph, throughput=n <= 300))
        if n <= 300:
            comparison += compare(f"synthetic-{n}", graph)
    write_markdown(timing, comparison, load, RESULTS / "cut_solver.md")
    (RESULTS / "cut_solver.json").write_text(
        json.dumps({"timing": timing, "comparison": comparison}, indent=1, sort_keys=True) + "\n"
    )
    print(f"wrote {RESULTS / 'cut_solver.md'}")


if __name__ == "__main__":
    main()
