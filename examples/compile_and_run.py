"""Compile a model for examples/cluster.yaml with the Python API, then run the build.

    python examples/compile_and_run.py
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

import partc

with tempfile.TemporaryDirectory() as tmp:
    build = partc.compile("examples/tiny_cnn.py:build", ["1,3,64,64"], "examples/cluster.yaml", Path(tmp) / "tiny")
    manifest = build.manifest  # partc.manifest.Manifest: what manifest.json holds, typed
    for stage in manifest.stages:
        for program in stage.programs:
            print(f"{stage.name}: {stage.backend} artifact {program.artifact} ({program.bytes} bytes)")
    for plan in manifest.plans:  # the primary plan, then those for other bandwidths or a dead tier
        latency = plan.predicted.latency(manifest.prices)  # the price the compiler and the runtime use
        print(f"plan {plan.name} ({plan.kind}): {dict(plan.programs)}, predicted {latency * 1e3:.1f} ms")
    pipeline = partc.load(build.path)  # checks every artifact's sha256, then loads it
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    got = pipeline({"x": x})["output"]
    with torch.no_grad():
        want = partc.load_model("examples/tiny_cnn.py:build")(torch.from_numpy(x)).numpy()
    print(f"max abs difference to the PyTorch model: {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
