"""Placement is pure: bin-packing by CPU and memory, replicas spread across hosts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unkey_deploy.core.errors import ResourceExhausted
from unkey_deploy.metald.placement import HostView, PlacementRequest, place, place_many

GiB = 1024**3


def hosts(*specs: tuple[str, int, int]) -> list[HostView]:
    return [HostView(h, cpus, mem * GiB) for h, cpus, mem in specs]


def test_best_fit_packs_the_fullest_host_that_fits() -> None:
    hs = [HostView("a", 8, 16 * GiB, used_cpus=6, used_memory_bytes=12 * GiB),
          HostView("b", 8, 16 * GiB)]  # fmt: skip
    assert place(PlacementRequest("d1", 1, GiB), hs) == "a"
    # too big for what is left on a
    assert place(PlacementRequest("d1", 4, GiB), hs) == "b"
    assert place(PlacementRequest("d1", 1, 8 * GiB), hs) == "b"


def test_replicas_of_one_deployment_spread_before_packing() -> None:
    hs = hosts(("a", 8, 16), ("b", 8, 16), ("c", 8, 16))
    got = place_many([PlacementRequest("web", 1, GiB)] * 3, hs)
    assert sorted(got) == ["a", "b", "c"]
    got6 = place_many([PlacementRequest("web", 1, GiB)] * 6, hs)
    assert {h: got6.count(h) for h in "abc"} == {"a": 2, "b": 2, "c": 2}
    # VMs of different deployments pack onto one host (best fit), not spread
    other = place_many([PlacementRequest(d, 1, GiB) for d in ("x", "y", "z")], hs)
    assert len(set(other)) == 1


def test_unschedulable_hosts_are_skipped_and_exhaustion_is_named() -> None:
    hs = [HostView("a", 64, 64 * GiB, schedulable=False), HostView("b", 2, 2 * GiB)]
    assert place(PlacementRequest("d", 2, GiB), hs) == "b"
    with pytest.raises(ResourceExhausted, match="no host can fit 4 vCPU"):
        place(PlacementRequest("d", 4, GiB), hs)
    with pytest.raises(ResourceExhausted):
        place(PlacementRequest("d", 1, GiB), [])


def test_deterministic_ties() -> None:
    hs = hosts(("b", 4, 8), ("a", 4, 8))
    assert place(PlacementRequest("d", 1, GiB), hs) == "a"


@given(
    caps=st.lists(st.tuples(st.integers(1, 16), st.integers(1, 32)), min_size=1, max_size=5),
    reqs=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 8)), max_size=20),
)
def test_never_overcommits(caps: list[tuple[int, int]], reqs: list[tuple[int, int]]) -> None:
    views = {f"h{i}": HostView(f"h{i}", c, m * GiB) for i, (c, m) in enumerate(caps)}
    used = {h: [0, 0] for h in views}
    for cpu, mem in reqs:
        req = PlacementRequest("d", cpu, mem * GiB)
        try:
            h = place(req, list(views.values()))
        except ResourceExhausted:
            # really nothing fits
            assert all(v.free_cpus < cpu or v.free_memory_bytes < mem * GiB for v in views.values())
            continue
        used[h][0] += cpu
        used[h][1] += mem * GiB
        v = views[h]
        views[h] = HostView(h, v.cpus, v.memory_bytes, used[h][0], used[h][1])
        assert used[h][0] <= v.cpus and used[h][1] <= v.memory_bytes
