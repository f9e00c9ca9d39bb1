"""Read side of billing for everyone (gatewayd, the CLI through it): invoices, usage, the
design's three queries. Tenant scoping is the caller's principal: every customer-facing method
takes the customer id from it, never from the request."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..clickhouse import queries as chq
from ..clickhouse.api import Storage
from ..core.clock import Clock
from ..core.errors import NotFound
from .customers import CustomerDirectory
from .invoice import Invoice, UsageTotals, build_invoice, check_month

SQL_INVOICE_TOTALS = """
SELECT
    pricing_version,
    toString(sum(cpu_time_ns)) AS cpu_time_ns,
    toString(sum(mem_byte_ns)) AS mem_byte_ns,
    toString(sum(net_rx_bytes) + sum(net_tx_bytes)) AS net_bytes,
    toString(sum(storage_byte_ns)) AS storage_byte_ns,
    toString(sum(gap_ns)) AS gap_ns
FROM billing_hourly FINAL
WHERE customer_id = {customer_id:String}
  AND hour >= {start:DateTime('UTC')}
  AND hour < {end:DateTime('UTC')}
GROUP BY pricing_version
ORDER BY pricing_version
"""


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)  # Decimal


@dataclass
class BillingQueries:
    storage: Storage
    directory: CustomerDirectory
    clock: Clock

    def invoice(self, customer_id: str, month: str) -> Invoice:
        check_month(month)
        cust = self.directory.customer(customer_id)
        if cust is None:
            raise NotFound(f"customer {customer_id} not found")
        start, end = chq.month_bounds(month)
        rows = self.storage.query(
            SQL_INVOICE_TOTALS,
            {
                "customer_id": customer_id,
                "start": start.strftime("%Y-%m-%d %H:%M:%S"),
                "end": end.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        totals = [
            UsageTotals(
                pricing_version=str(r["pricing_version"]),
                tier=cust.pricing_tier,
                cpu_ns=int(r["cpu_time_ns"]),
                mem_byte_ns=int(r["mem_byte_ns"]),
                net_bytes=int(r["net_bytes"]),
                storage_byte_ns=int(r["storage_byte_ns"]),
                gap_ns=int(r["gap_ns"]),
            )
            for r in rows
        ]
        return build_invoice(
            customer_id,
            month,
            totals,
            discount_pct=cust.discount_pct,
            credit_balance=cust.credit_balance,
        )

    def current_month(self) -> str:
        return self.clock.now().astimezone(UTC).strftime("%Y-%m")

    def dashboard(self, customer_id: str) -> list[dict[str, Any]]:
        now = self.clock.now().astimezone(UTC)
        return [
            _jsonable(asdict(v))
            for v in chq.dashboard(self.storage, customer_id=customer_id, now=now)
        ]

    def usage(
        self, customer_id: str, *, vm_id: str | None = None, since_s: float = 3600.0
    ) -> dict[str, Any]:
        now = self.clock.now().astimezone(UTC)
        start = now - timedelta(seconds=since_s)
        points = chq.vm_usage(
            self.storage, customer_id=customer_id, vm_id=vm_id, start=start, end=now
        )
        return {
            "customer_id": customer_id,
            "vm_id": vm_id,
            "since": start.isoformat(),
            "until": now.isoformat(),
            "vms": self.dashboard(customer_id),
            "points": [_jsonable(asdict(p)) for p in points],
        }

    def capacity(self, *, days: int = 7) -> list[dict[str, Any]]:
        now = self.clock.now().astimezone(UTC)
        rows = chq.capacity_planning(
            self.storage, start=now - timedelta(days=days), end=now, customer_id=None
        )
        return [_jsonable(asdict(r)) for r in rows]
