"""Calibrate partc's cost model on this host and report its leave-one-model-out error.

Run from the repository root::

    python benchmarks/cost_model.py              # profile (cached), fit, write results
    python benchmarks/cost_model.py --remeasure  # profile every model again

Steps:

1. Profile every model of ``MODELS`` with ``partc.profile.profile_model`` at
   ``THREADS`` threads (``benchmarks/results/profiles/NAME.json``, the same files
   ``partc profile`` writes), and measure this host's attainable peak: sgemm GFLOP/s and
   copy bandwidth at the same thread count.
2. Fit the calibration on all models and write it to ``targets/calibration.json``, the
   data the ``annotate-profile`` pass ships with.
3. Leave one model out: fit on the others, predict the left-out model's whole-model
   latency (sum of predicted node times), compare with its measured whole-model median.
4. Write ``benchmarks/results/cost_model.md`` (tables) and ``cost_model.json`` (numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from partc.costmodel import Calibration, fit_calibration, predict_profile_total, write_calibration
from partc.profile import host_fingerprint, profile_model, read_profile, write_profile
from partc.report import trace_model
from partc.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CALIBRATION = ROOT / "targets" / "calibration.json"
MODELS = (
    "resnet18", "resnet50", "googlenet", "mobilenet_v2", "mobilenet_v3_large", "densenet121",
    "squeezenet1_0", "vgg16", "efficientnet_b0", "shufflenet_v2_x1_0",
)
THREADS = 2
WARMUP = 3
REPEATS = 15
SCISSION_MS = {  # PRIOR_ART.md section 3: measured totals (Keras) on Scission's machines
    "vgg16": {"rpi4": 2111, "edge-x86": 388, "cloud-cpu": 113.5, "cloud-gpu": 7.4},
    "resnet50": {"rpi4": 961, "edge-x86": 222, "cloud-cpu": 81.5, "cloud-gpu": 34.5},
    "mobilenet_v2": {"rpi4": 444, "edge-x86": 109, "cloud-cpu": 54.5, "cloud-gpu": 34.7},
    "densenet121": {"rpi4": 1241, "edge-x86": 275, "cloud-cpu": 122.7, "cloud-gpu": 73.4},
}


def measure_profiles(remeasure: bool) -> dict:
    """Profile every model (unless cached); return name -> Profile."""
    out = {}
    for name in MODELS:
        path = RESULTS / "profiles" / f"{name}.json"
        if remeasure or not path.is_file():
            gm = trace_model(f"torchvision:{name}", ["1,3,224,224"])
            start = time.perf_counter()
            profile = profile_model(gm, model=f"torchvision:{name}", warmup=WARMUP, repeats=REPEATS,
                                    threads=THREADS)
            write_profile(profile, path)
            print(f"profiled {name}: whole {profile.whole_median_s * 1e3:.1f} ms, "
                  f"sum of nodes {profile.sum_node_median_s * 1e3:.1f} ms ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
        out[name] = read_profile(path)
    return out


def measure_host(threads: int) -> dict:
    """Attainable sgemm GFLOP/s and copy GB/s of this host at ``threads`` threads (medians of 7)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        src = torch.empty(64 * 2**20)
        dst = torch.empty_like(src)
        gemm, copy = [], []
        for _ in range(10):
            start = time.perf_counter()
            torch.mm(a, b)
            gemm.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            dst.copy_(src)
            copy.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(saved)
    return {"peak_gflops": max(gemm), "memory_bandwidth_gbs": max(copy)}
