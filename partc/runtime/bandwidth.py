"""Smoothed estimates of what the runtime measures: link bandwidth and stage compute time.

Plan switching reads these: a link's bandwidth is the exponentially weighted moving
average (EWMA) of the bytes it carried divided by the EWMA of the seconds they took, so a
large transfer weighs more than a small one, and one slow sample moves the estimate by
``alpha`` of the way rather than all of it.
"""

from __future__ import annotations


class Ewma:
    """Exponentially weighted moving average; the first sample is taken as is.

    Attributes:
        alpha: weight of a new sample, in (0, 1].
        value: the current average, None before the first sample.
        count: samples seen.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        """Raises: ValueError: if ``alpha`` is not in (0, 1]."""
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def add(self, sample: float) -> float:
        """Fold ``sample`` in and return the new average."""
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        self.count += 1
        return self.value


class BandwidthEstimator:
    """Bandwidth of one link from (bytes, seconds) samples, one per transfer.

    Attributes:
        total_bytes: bytes of every sample.
        total_seconds: seconds of every sample.
    """

    MIN_SECONDS = 1e-6  # a sample faster than the clock can tell counts as this long

    def __init__(self, alpha: float = 0.3) -> None:
        """Raises: ValueError: if ``alpha`` is not in (0, 1]."""
        self._bytes = Ewma(alpha)
        self._seconds = Ewma(alpha)
        self.total_bytes = 0
        self.total_seconds = 0.0

    def add(self, nbytes: int, seconds: float) -> None:
        """Record one transfer of ``nbytes`` that took ``seconds``."""
        seconds = max(seconds, self.MIN_SECONDS)
        self._bytes.add(float(nbytes))
        self._seconds.add(seconds)
        self.total_bytes += nbytes
        self.total_seconds += seconds

    @property
    def count(self) -> int:
        """Transfers recorded."""
        return self._bytes.count

    @property
    def bytes_per_second(self) -> float | None:
        """The smoothed bandwidth, None before the first transfer."""
        if self._seconds.value is None:
            return None
        return self._bytes.value / self._seconds.value
