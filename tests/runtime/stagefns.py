"""Stage functions of a small three-stage model, for the runtime tests and the worker processes.

Model inputs ``x`` (float32 [B, 8]) and ``b`` (float32 [6]); ``b`` is read only by the last
stage, so the first two forward it. ``device.0`` writes ``skip``, read by ``cloud.0`` two hops
later, and the model output ``output.1``. Worker processes import this module by name
(``--fn stagefns:make``) with this folder on PYTHONPATH.
"""

import time

import numpy as np

from partc.runtime.routes import StageSpec

MODEL_INPUTS = ("x", "b")
MODEL_OUTPUTS = ("output.0", "output.1")
STAGES = (
    StageSpec("device.0", "", ("x",), ("h1", "skip", "output.1")),
    StageSpec("edge.0", "", ("h1",), ("h2",)),
    StageSpec("cloud.0", "", ("h2", "skip", "b"), ("output.0",)),
)

_rng = np.random.default_rng(0)
W1 = _rng.standard_normal((8, 16)).astype(np.float32)
W2 = _rng.standard_normal((16, 16)).astype(np.float32)
W3 = _rng.standard_normal((16, 6)).astype(np.float32)


def device(t):
    x = t["x"]
    return {"h1": np.tanh(x @ W1), "skip": x[:, :6] * 2, "output.1": x.sum(axis=1, dtype=np.float64)}


def edge(t):
    return {"h2": np.maximum(t["h1"] @ W2, 0)}


def cloud(t):
    return {"output.0": t["h2"] @ W3 + t["skip"] + t["b"]}


FNS = {"device.0": device, "edge.0": edge, "cloud.0": cloud}


def make(stage):
    """Factory for ``--fn stagefns:make``: the stage function of ``stage``."""
    return FNS[stage]


def make_slow_edge(stage):
    """Like ``make``, but ``edge.0`` takes 6 s: a worker that hangs (short enough not to delay exit)."""
    if stage != "edge.0":
        return FNS[stage]

    def slow(t):
        time.sleep(6)
        return edge(t)

    return slow


def inputs(n, batch=4):
    """``n`` seeded model inputs."""
    rng = np.random.default_rng(1)
    return [
        {"x": rng.standard_normal((batch, 8)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)}
        for _ in range(n)
    ]


def reference(item):
    """The model computed in one piece."""
    h1 = np.tanh(item["x"] @ W1)
    h2 = np.maximum(h1 @ W2, 0)
    return {"output.0": h2 @ W3 + item["x"][:, :6] * 2 + item["b"], "output.1": item["x"].sum(axis=1, dtype=np.float64)}
