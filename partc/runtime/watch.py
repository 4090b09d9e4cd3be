"""Which of a tier's nodes have slowed down, as the tier's first node sees them run its steps.

A tiled (or branched) stage's first node, the coordinator, times every program of its steps:
its own (node 0) and each call to a further node, the call's transfers included. Each time,
divided by what the manifest predicts for it (a call: the program's predicted seconds, its
tensors' transfers over the tier's link and the call's own cost, ``LinkPrice``), is a ratio;
per node, an exponentially weighted mean of the ratios (``ALPHA``) says how much slower than
predicted that node runs. A node is slow when its mean is ``SLOW_FACTOR`` times node 0's, after
``MIN_SAMPLES`` calls: predictions that are off for the whole tier (machines other than the
target) cancel out, a node slowed down by load, heat or its link stands out.

The coordinator's worker names its slow nodes in its health answers, as it names those it
cannot reach (``partc.runtime.worker``); the driver asks while a plan uses several nodes of a
tier and moves to a plan without them (``partc.runtime.driver``). A verdict lapses ``HOLD``
seconds after the node's last call (a plan without the node calls it no more), so the driver's
probe then finds the node usable and tries it again; still slow, it is found out again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

SLOW_FACTOR = 2.0  # a node this many times slower, relative to its prediction, than the coordinator is slow
ALPHA = 0.3  # weight of the newest ratio in a node's mean
MIN_SAMPLES = 3  # calls to a node before it is judged
HOLD = 10.0  # seconds a slow verdict lasts after the node's last call


class NodeWatch:
    """The ratios of measured to predicted seconds of a tier's nodes (module docstring). Thread-safe:
    calls to several nodes are timed at once."""

    def __init__(self, names: Mapping[int, str], predicted: Mapping[str, float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``names``: node index -> stage name (0: the coordinator); ``predicted``: program id ->
        predicted seconds of running it on its node (a further node's: the whole call)."""
        self._names, self._predicted, self._clock = dict(names), dict(predicted), clock
        self._lock = threading.Lock()
        self._mean: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._last: dict[int, float] = {}

    def observe(self, node: int, pid: str, seconds: float) -> None:
        """Record that node ``node`` ran program ``pid`` (a further node: was called to) in ``seconds``."""
        predicted = self._predicted.get(pid)
        if not predicted or predicted <= 0:
            return
        ratio, now = seconds / predicted, self._clock()
        with self._lock:
            if now - self._last.get(node, now) >= HOLD:  # a lapsed verdict: judge the node afresh
                del self._mean[node], self._count[node]
            old = self._mean.get(node)
            self._mean[node] = ratio if old is None else ALPHA * ratio + (1 - ALPHA) * old
            self._count[node] = self._count.get(node, 0) + 1
            self._last[node] = now

    def slow(self) -> list[str]:
        """The further nodes that run slow now (module docstring), by stage name."""
        now = self._clock()
        with self._lock:
            base = self._mean.get(0)
            if base is None:
                return []
            return sorted(self._names[t] for t, mean in self._mean.items()
                          if t and self._count[t] >= MIN_SAMPLES and now - self._last[t] < HOLD
                          and mean > SLOW_FACTOR * base)
