"""Typed, prefixed, time-sortable ids: ``cust_01J...``.

An id is ``<prefix>_<26 chars Crockford base32>``: 48 bits of milliseconds then 80 random bits, so
ids sort by creation time and never collide in practice. Signatures use the ``NewType``s below,
never bare ``str``.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import NewType

from .errors import InvalidInput

CustomerId = NewType("CustomerId", str)
TenantId = NewType("TenantId", str)
DeploymentId = NewType("DeploymentId", str)
BuildId = NewType("BuildId", str)
AssetId = NewType("AssetId", str)
VmId = NewType("VmId", str)
InstanceId = NewType("InstanceId", str)
HostId = NewType("HostId", str)
RequestId = NewType("RequestId", str)
KeyId = NewType("KeyId", str)
BatchId = NewType("BatchId", str)

PREFIXES = {
    "customer": "cust",
    "tenant": "ten",
    "deployment": "dep",
    "build": "bld",
    "asset": "ast",
    "vm": "vm",
    "instance": "inst",
    "host": "host",
    "request": "req",
    "key": "key",
}

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RE = re.compile(r"^(?P<prefix>[a-z]{2,5})_(?P<body>[0-9A-HJKMNP-TV-Z]{26})$")


def _body(ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if ms is None else ms
    value = (ms & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """A fresh id with the given prefix (e.g. ``new_id("dep")``)."""
    return f"{prefix}_{_body()}"


def new_customer_id() -> CustomerId:
    return CustomerId(new_id("cust"))


def new_tenant_id() -> TenantId:
    return TenantId(new_id("ten"))


def new_deployment_id() -> DeploymentId:
    return DeploymentId(new_id("dep"))


def new_build_id() -> BuildId:
    return BuildId(new_id("bld"))


def new_asset_id() -> AssetId:
    return AssetId(new_id("ast"))


def new_vm_id() -> VmId:
    return VmId(new_id("vm"))


def new_instance_id() -> InstanceId:
    return InstanceId(new_id("inst"))


def new_host_id() -> HostId:
    return HostId(new_id("host"))


def new_request_id() -> RequestId:
    return RequestId(new_id("req"))


def new_key_id() -> KeyId:
    return KeyId(new_id("key"))


def parse_id(value: str, prefix: str) -> str:
    """Check that ``value`` is a well-formed id with ``prefix``; raise InvalidInput otherwise."""
    m = _ID_RE.match(value)
    if not m or m.group("prefix") != prefix:
        raise InvalidInput(f"{value!r} is not a valid {prefix}_ id")
    return value


def is_id(value: str, prefix: str) -> bool:
    m = _ID_RE.match(value)
    return bool(m and m.group("prefix") == prefix)
