"""Who a customer is, for billing: pricing tier, discount and credits (the control plane's
``customers`` table), and whether a VM is known. A small Protocol with an SQL implementation
over the control-plane store and an in-memory one for unit tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import NotFound, Unavailable
from ..store import controlplane as cp


@dataclass(frozen=True, slots=True)
class CustomerInfo:
    customer_id: str
    tenant_id: str
    pricing_tier: str
    discount_pct: Decimal
    credit_balance: Decimal


class CustomerDirectory(Protocol):
    def customer(self, customer_id: str) -> CustomerInfo | None:
        """The customer, or None when unknown (its usage is quarantined)."""
        ...

    def known_vm(self, customer_id: str, vm_id: str) -> bool:
        """Whether ``vm_id`` is a VM of this customer (unknown VMs are quarantined)."""
        ...


class MemoryDirectory:
    """For tests: customers and their VMs given up front (``vms=None``: any VM is known)."""

    def __init__(
        self, customers: Iterable[CustomerInfo], vms: dict[str, set[str]] | None = None
    ) -> None:
        self._customers = {c.customer_id: c for c in customers}
        self._vms = vms

    def customer(self, customer_id: str) -> CustomerInfo | None:
        return self._customers.get(customer_id)

    def known_vm(self, customer_id: str, vm_id: str) -> bool:
        if self._vms is None:
            return customer_id in self._customers
        return vm_id in self._vms.get(customer_id, set())

    def set(self, info: CustomerInfo) -> None:
        self._customers[info.customer_id] = info


@contextlib.contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """A control-plane database that cannot answer (down, locked, unreachable) is Unavailable:
    the aggregator's loop then leaves the messages unacked and tries again (any other error
    would end the loop)."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise Unavailable(
            f"billing: cannot read {what} from the control-plane database: "
            f"{type(exc).__name__}: {exc}",
            suggestion="check that the control-plane database (database_url) is reachable",
            retryable=True,
        ) from exc


class SqlDirectory:
    """Reads the control-plane store (SQLite or PostgreSQL), cached for ``ttl_s``. Database
    failures raise :class:`~unkey_deploy.core.errors.Unavailable`.

    A VM is unknown when metald has it on record (``metald_vms``) for ANOTHER customer (spoofed
    or misrouted usage). metald deletes a VM's record when the VM is deleted, and its last
    batches may arrive after that, so a VM with no record is not treated as unknown.
    """

    def __init__(self, factory: sessionmaker[Session], ttl_s: float = 30.0) -> None:
        self._factory = factory
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, CustomerInfo | None]] = {}
        self._vm_cache: dict[tuple[str, str], tuple[float, bool]] = {}
        self._has_vms: bool | None = None

    def customer(self, customer_id: str) -> CustomerInfo | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(customer_id)
            if hit and now - hit[0] < self._ttl:
                return hit[1]
        info: CustomerInfo | None
        with _db_errors(f"customer {customer_id}"), self._factory() as s:
            try:
                c = cp.get_customer(s, customer_id)
                info = CustomerInfo(
                    customer_id=c.id,
                    tenant_id=c.tenant_id,
                    pricing_tier=c.pricing_tier,
                    discount_pct=c.discount_pct,
                    credit_balance=c.credit_balance,
                )
            except NotFound:
                info = None
        with self._lock:
            self._cache[customer_id] = (now, info)
        return info

    def known_vm(self, customer_id: str, vm_id: str) -> bool:
        if self.customer(customer_id) is None:
            return False
        now = time.monotonic()
        with self._lock:
            hit = self._vm_cache.get((customer_id, vm_id))
            if hit and now - hit[0] < self._ttl:
                return hit[1]
        with _db_errors(f"VM {vm_id}"), self._factory() as s:
            if self._has_vms is None:
                self._has_vms = inspect(s.get_bind()).has_table("metald_vms")
            if not self._has_vms:
                known = True
            else:
                row = s.execute(
                    text("SELECT customer_id FROM metald_vms WHERE vm_id = :v"), {"v": vm_id}
                ).first()
                known = row is None or row[0] == customer_id
        with self._lock:
            self._vm_cache[(customer_id, vm_id)] = (now, known)
        return known
