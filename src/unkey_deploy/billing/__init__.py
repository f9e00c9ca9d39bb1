"""The billing aggregator: exact usage per VM-hour (BILLING.md), stored in ClickHouse, priced with
versioned price sheets and invoiced per customer-month.

Interface for other services: :mod:`.service` (``run_billing_service``), :mod:`.http` (the
gateway's ``router``), :mod:`.queries` (``BillingQueries``).
"""
