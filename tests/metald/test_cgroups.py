"""metald's cgroup tuning: the kernel's ``favordynmods``, which makes a VM's cgroup join cheap."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from unkey_deploy.metald.cgroups import (
    _cgroup_mounts,
    favor_dynmods,
    favordynmods_on,
    set_cgroup2_root_option,
)
from unkey_deploy.metald.service import Metald

MetaldFactory = Callable[..., Metald]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (sets a cgroup2 root option)"),
]


def _v2_options() -> list[str]:
    return next(opts for fstype, _, opts in _cgroup_mounts() if fstype == "cgroup2")


def test_favor_dynmods_sets_only_that_option() -> None:
    before = sorted(o for o in _v2_options() if o != "favordynmods")
    # Other tests' metalds turn it on at their start, possibly between our two steps: then
    # favor_dynmods() rightly says "on" (nothing to do); try again until we see it do the work.
    for _ in range(20):
        set_cgroup2_root_option("favordynmods", False)
        assert "favordynmods" not in _v2_options() or favordynmods_on()
        state = favor_dynmods()
        assert state.startswith("on") and favordynmods_on()
        if state == "on (set by metald)":
            break
    else:
        pytest.fail("favor_dynmods() never had to set the option itself in 20 tries")
    # the root's other options are kept
    assert sorted(o for o in _v2_options() if o != "favordynmods") == before
    assert favor_dynmods() == "on"  # idempotent


def test_metald_reports_favordynmods(make_metald: MetaldFactory) -> None:
    md = make_metald("sandbox")
    # (not the host's flag itself here: the test above turns it off and on meanwhile)
    assert md.status()["cgroup_favordynmods"].startswith("on")
    off = make_metald("sandbox", name="h2", cgroup_favordynmods=False)
    assert off.status()["cgroup_favordynmods"].startswith("not requested")
