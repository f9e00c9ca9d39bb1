"""metald's tables: the source of truth the code uses.

Every change here also needs a new revision in metald/migrations/versions (revisions are history and
spell their columns out, so an old revision keeps creating the old schema);
tests/metald/test_schema.py fails when these models and the migrated schema differ."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

hosts = sa.Table(
    "metald_hosts",
    metadata,
    sa.Column("host_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("driver", sa.String(16), nullable=False),
    sa.Column("cpus", sa.Integer, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("capabilities", sa.JSON, nullable=False),
    sa.Column("schedulable", sa.Boolean, nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    # set when another host found this one's heartbeat stale and declared its VMs lost
    sa.Column("lost_at", sa.Float, nullable=True),
)

vms = sa.Table(
    "metald_vms",
    metadata,
    sa.Column("vm_id", sa.String(40), primary_key=True),
    sa.Column("host_id", sa.String(40), nullable=False, index=True),
    sa.Column("deployment_id", sa.String(40), nullable=False, index=True),
    sa.Column("customer_id", sa.String(40), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    # what the owner asked for: "running", "stopped" or "deleted"; each host's agent converges
    sa.Column("desired", sa.String(16), nullable=False),
    sa.Column("instance_id", sa.String(40), nullable=True),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("rootfs", sa.Text, nullable=False),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("driver", sa.String(16), nullable=True),
    sa.Column("net", sa.JSON, nullable=True),
    sa.Column("runtime", sa.JSON, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    # the asset the rootfs came from; metald leases it (holder: the VM id) while the row exists
    sa.Column("asset_id", sa.String(40), nullable=True),
    # readiness: GET health_path (None: "/") on health_port (None: the app's port)
    sa.Column("health_path", sa.Text, nullable=True),
    sa.Column("health_port", sa.Integer, nullable=True),
    # for a lost VM: the VM placed in its stead
    sa.Column("replaced_by", sa.String(40), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

ip_leases = sa.Table(
    "metald_ip_leases",
    metadata,
    sa.Column("host_id", sa.String(40), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("vm_id", sa.String(40), nullable=False, unique=True),
    sa.Column("leased_at", sa.Float, nullable=False),
)
