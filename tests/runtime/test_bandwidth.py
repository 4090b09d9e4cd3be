import pytest

from partc.runtime.bandwidth import BandwidthEstimator, Ewma


def test_ewma_moves_alpha_of_the_way():
    e = Ewma(alpha=0.5)
    assert e.value is None
    assert e.add(10.0) == 10.0
    assert e.add(20.0) == 15.0
    assert e.count == 2
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        Ewma(0)


def test_bandwidth_is_smoothed_bytes_over_smoothed_seconds():
    b = BandwidthEstimator(alpha=0.5)
    assert b.bytes_per_second is None
    b.add(1_000_000, 0.1)  # 10 MB/s
    assert b.bytes_per_second == pytest.approx(10e6)
    b.add(1_000_000, 0.4)  # a slow transfer moves the estimate, not all the way: 1e6 / 0.25
    assert b.bytes_per_second == pytest.approx(4e6)
    assert (b.count, b.total_bytes, b.total_seconds) == (2, 2_000_000, pytest.approx(0.5))


def test_a_zero_duration_sample_does_not_divide_by_zero():
    b = BandwidthEstimator()
    b.add(100, 0.0)
    assert b.bytes_per_second == pytest.approx(100 / BandwidthEstimator.MIN_SECONDS)
