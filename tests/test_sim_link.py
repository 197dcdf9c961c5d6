"""sim/link.py: measuring the link between two stage processes."""

from __future__ import annotations

import pytest

from timeprest.errors import ConfigError
from timeprest.sim.link import fit_link, measure_link


def test_fit_link_separates_latency_and_bandwidth():
    # one_way = 1e-4 + size / 1e9
    lat, bw = fit_link((4, 1e-4 + 4 / 1e9), (10**6, 1e-4 + 10**6 / 1e9))
    assert lat == pytest.approx(1e-4) and bw == pytest.approx(1e9)
    # a large message no slower than the small one: infinite bandwidth
    assert fit_link((4, 2e-4), (10**6, 1e-4)) == (1e-4, None)
    with pytest.raises(ConfigError, match="must be larger"):
        fit_link((10, 1.0), (10, 2.0))


@pytest.mark.parametrize("transport", ["shm", "process-group"])
def test_measure_link_on_this_machine(transport):
    link = measure_link(1 << 20, repeats=5, transport=transport)
    assert 0 <= link.latency < 0.5
    assert link.bandwidth is None or link.bandwidth > 1e6  # over a megabyte a second
    assert 0 < link.overhead < 0.5  # moving a mebibyte costs some CPU time
    with pytest.raises(ConfigError, match="more than 4 bytes"):
        measure_link(4)


def test_link_needs_a_known_transport():
    from timeprest.sim.link import link_between

    with pytest.raises(ConfigError, match="unknown transport 'tcp'"):
        link_between(1, 64, first=True, transport="tcp")
