"""A user's stop in the deployment lifecycle: the pure decision (``stop_action``) and the
transitions it relies on, each recorded as an event."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from unkey_deploy.core.errors import IllegalTransition, InvalidInput
from unkey_deploy.store import controlplane as cp
from unkey_deploy.store import db

SPEC = {"name": "web", "image": "nginx:1.27", "resources": {"cpu": 1, "memory": "256MiB"}}


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    db.upgrade(engine)
    yield db.session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize(
    ("state", "live", "action"),
    [
        ("accepted", True, "cancel"),
        ("accepted", False, "cancel"),
        ("running", False, "stop"),
        ("failed", True, "stop"),  # a failed deploy's retry may be queued: the stop wins
        ("failed", False, "stop"),
        ("stopping", False, "none"),
        ("stopped", False, "none"),
        ("cancelled", False, "none"),
        # the deploy job ended (out of attempts) without finishing: nothing moves it any more
        ("building", False, "stop"),
        ("deploying", False, "stop"),
        # a deploy at work is interrupted: its job asked to cancel, a stop job after it
        ("building", True, "interrupt"),
        ("deploying", True, "interrupt"),
    ],
)
def test_stop_action(state: str, live: bool, action: str) -> None:
    assert cp.stop_action("dep_x", state, deploy_job_live=live) == action


def test_every_state_has_a_stop_decision() -> None:
    for state in cp.DEPLOYMENT_STATES:
        for live in (True, False):
            assert cp.stop_action("dep_x", state, deploy_job_live=live) in (
                "cancel", "interrupt", "stop", "none",
            )  # fmt: skip
    with pytest.raises(InvalidInput, match="unknown deployment state 'paused'"):
        cp.stop_action("dep_x", "paused", deploy_job_live=True)


def _deployment(s: Session, tenant: str) -> cp.Deployment:
    c = cp.create_customer(s, f"{tenant}-c", now=1.0)
    return cp.create_deployment(s, tenant_id=c.tenant_id, customer_id=c.id, request_id="req_1",
                                spec=SPEC, now=1.0)  # fmt: skip


def test_stop_paths_through_the_lifecycle_each_with_its_event(
    factory: sessionmaker[Session],
) -> None:
    with db.transaction(factory) as s:
        dep = _deployment(s, "stops")
        for i, state in enumerate(["building", "deploying", "running", "stopping", "stopped"]):
            cp.record_state(s, dep.id, state, now=2.0 + i)
        with pytest.raises(IllegalTransition, match="from stopped to"):
            cp.record_state(s, dep.id, "stopping", now=9.0)
        states = [e.data["state"] for e in cp.events_after(s, dep.id) if e.phase == "state"]
        assert states == ["building", "deploying", "running", "stopping", "stopped"]
        assert cp.get_deployment(s, dep.id, tenant_id=None).state == "stopped"


def test_failed_can_be_stopped_and_a_failed_stop_stopped_again(
    factory: sessionmaker[Session],
) -> None:
    with db.transaction(factory) as s:
        dep = _deployment(s, "failed-stops")
        for state in ["building", "failed", "stopping", "failed", "stopping", "stopped"]:
            cp.record_state(s, dep.id, state, now=3.0)
        # never from a final state, never back to building from a stop
        with pytest.raises(IllegalTransition):
            cp.record_state(s, dep.id, "building", now=4.0)
        other = _deployment(s, "cancels")
        cp.record_state(s, other.id, "cancelled", now=3.0)
        for state in ["stopping", "building", "failed"]:
            with pytest.raises(IllegalTransition):
                cp.record_state(s, other.id, state, now=4.0)


def test_stopping_cannot_go_back_to_deploying(factory: sessionmaker[Session]) -> None:
    """A deploy job that finds its deployment stopping must not resume it."""
    with db.transaction(factory) as s:
        dep = _deployment(s, "no-resume")
        for state in ["building", "failed", "stopping"]:
            cp.record_state(s, dep.id, state, now=3.0)
        for state in ["building", "deploying", "running"]:
            with pytest.raises(IllegalTransition):
                cp.record_state(s, dep.id, state, now=4.0)


@pytest.mark.parametrize("at", ["building", "deploying"])
def test_a_deploy_at_work_can_be_stopped_and_never_resumed(
    factory: sessionmaker[Session], at: str
) -> None:
    """The interrupt path: building/deploying -> stopping; from there only the stop job's moves."""
    with db.transaction(factory) as s:
        dep = _deployment(s, f"interrupt-{at}")
        for state in ["building", "deploying"][: 1 if at == "building" else 2]:
            cp.record_state(s, dep.id, state, now=3.0)
        cp.record_state(s, dep.id, "stopping", now=4.0)
        for state in ["building", "deploying", "running", "cancelled"]:
            with pytest.raises(IllegalTransition, match=f"from stopping to {state}"):
                cp.record_state(s, dep.id, state, now=5.0)
        cp.record_state(s, dep.id, "stopped", now=6.0)
        states = [e.data["state"] for e in cp.events_after(s, dep.id) if e.phase == "state"]
        assert states[-2:] == ["stopping", "stopped"]


def test_a_deploys_failure_is_recorded_only_while_it_deploys(
    factory: sessionmaker[Session],
) -> None:
    """``only_from``: the deploy's own failure never lands over a user's stop."""
    with db.transaction(factory) as s:
        dep = _deployment(s, "only-from")
        cp.record_state(s, dep.id, "building", now=2.0)
        cp.record_state(s, dep.id, "stopping", now=3.0)  # the user's stop
        with pytest.raises(IllegalTransition, match="is stopping \\(not building or deploying\\)"):
            cp.record_state(s, dep.id, "failed", now=4.0, error={"code": "vm_error"},
                            only_from=("building", "deploying"))  # fmt: skip
        assert cp.get_deployment(s, dep.id, tenant_id=None).state == "stopping"
        cp.record_state(s, dep.id, "failed", now=5.0, only_from=("stopping",))  # the stop job's
        assert cp.get_deployment(s, dep.id, tenant_id=None).state == "failed"
