"""A self-signed certificate for local stacks, generated with ``cryptography``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


def self_signed_cert(
    key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    *,
    sans: list[x509.GeneralName] | None = None,
    days: int = 825,
) -> x509.Certificate:
    """A certificate for ``key`` signed by itself and usable as its own CA."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def ensure_self_signed(cert_file: Path, key_file: Path, *, hosts: tuple[str, ...] = ()) -> bool:
    """Create an EC P-256 key and a cert for localhost/127.0.0.1 unless both files exist.

    Returns True if it created them. The key file is written with mode 0600. The certificate is
    its own CA (``BasicConstraints(ca=True)``), so clients trust it with ``verify=cert_file``.
    """
    if cert_file.exists() and key_file.exists():
        return False
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = self_signed_cert(key, "unkey-deploy local gateway", sans=sans, days=825)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return True


def client_context(ca_cert: Path | str) -> ssl.SSLContext:
    """An SSL context trusting ``ca_cert`` (for httpx's ``verify=``)."""
    return ssl.create_default_context(cafile=str(ca_cert))
