"""A stand-in for the deploy workflow behind a real ``unkey deploy --wait`` (CLI tests).

    proc = subprocess.Popen([UNKEY, "deploy", app, "--wait"], env=gw.cli_env(customer.key), ...)
    dep_id, out, err = DeployDriver(gw.database_url)(proc, customer, drive)

Once the CLI has created its customer's deployment, ``drive(records, deployment_id)`` writes
what the workflow would (states, events) into the gateway's control-plane records, which the
CLI follows over the gateway's event stream.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from ..store import controlplane as cp
from ..store import db
from .gateway import TestCustomer

Drive = Callable[[cp.DeploymentRecords, str], None]


class DeployDriver:
    """Drives the deployments CLI processes create in one gateway's database (``close`` it)."""

    def __init__(self, database_url: str) -> None:
        self.engine = db.make_engine(database_url)
        self.factory = db.session_factory(self.engine)

    def __call__(
        self, proc: subprocess.Popen[Any], customer: TestCustomer, drive: Drive,
        *, settle_s: float = 0.0,
    ) -> tuple[str, Any, Any]:  # fmt: skip
        """Drive the deployment ``proc`` creates for ``customer``; (deployment id, stdout,
        stderr) once ``proc`` ended, which is killed if it outlives this. ``settle_s``: a pause
        before driving, for the CLI to attach to the event stream."""
        try:
            dep_id = self._created_by(customer)
            time.sleep(settle_s)
            drive(cp.DeploymentRecords(self.factory), dep_id)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return dep_id, out, err

    def _created_by(self, customer: TestCustomer, timeout_s: float = 20.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.factory() as s:
                dep_id = s.scalars(
                    select(cp.DeploymentRow.id).where(cp.DeploymentRow.customer_id == customer.id)
                ).first()
            if dep_id:
                return str(dep_id)
            if time.monotonic() > deadline:
                raise AssertionError(f"the CLI created no deployment in {timeout_s:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.engine.dispose()
