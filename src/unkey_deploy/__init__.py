"""unkey-deploy: container image in, hardened microVM out, metered at 10 Hz and billed exactly.

The folder tree is the architecture (see docs/architecture.md):

- ``core``       config, ids, errors, clock, logging: imports no service.
- ``store``      control-plane state (SQLAlchemy 2 + Alembic): SQLite WAL or PostgreSQL.
- ``gateway``    gatewayd: HTTPS API, auth, validation, enrichment, routing.
- ``builder``    builderd: OCI pull, layer apply, hardening, rootfs.ext4, build queue.
- ``assets``     assetmanagerd: content-addressed blobs (local FS / S3) + index + leases.
- ``metald``     VM drivers (qemu, firecracker, sandbox), jail, network, placement.
- ``metering``   10 Hz collector, billaged batching, batch codec.
- ``bus``        message bus interface + NATS JetStream transport.
- ``billing``    BillingAggregator: validate, price, roll up, invoice.
- ``clickhouse`` schema migrations, chDB and HTTP backends, queries.
- ``cli``        the ``unkey`` command.
- ``dev``        the local stack (``unkey dev up``).
"""

__version__ = "0.1.0"
