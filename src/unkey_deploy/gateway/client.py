"""A typed HTTP client for the gateway API, used by the CLI and by tests.

Every non-2xx answer becomes the matching :class:`~unkey_deploy.core.errors.UnkeyError` (the
``request_id`` lands in ``err.details["request_id"]``); a gateway that cannot be reached is
:class:`~unkey_deploy.core.errors.Unavailable` with a suggestion.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from ..core.errors import InvalidInput, Unavailable, UnkeyError, from_dict
from .tls import client_context

Json = dict[str, Any]


@dataclass(frozen=True)
class Event:
    """One server-sent event of a deployment's stream (``event == "end"`` closes it)."""

    id: int | None
    event: str
    data: Json


class GatewayClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        ca_cert: Path | str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.admin_token = admin_token
        verify: Any = self._ca_context(ca_cert) if ca_cert else True
        try:
            url = httpx.URL(self.base_url)
            if url.port is not None and not 0 < url.port < 65536:
                # the socket layer would take it modulo 65536: another port, sent our key
                raise httpx.InvalidURL(f"port {url.port} is out of range")
            self._http = httpx.Client(base_url=url, verify=verify, timeout=timeout)
        except httpx.InvalidURL as exc:
            raise InvalidInput(
                f"the API URL {self.base_url!r} is not a valid URL: {exc}",
                suggestion="set UNKEY_API_URL (or `unkey login --api-url`) to the gateway, "
                "e.g. https://127.0.0.1:8443",
            ) from None

    @staticmethod
    def _ca_context(ca_cert: Path | str) -> ssl.SSLContext:
        try:
            return client_context(ca_cert)
        except OSError as exc:  # missing, unreadable, or no PEM certificate in it (SSLError)
            raise InvalidInput(
                f"cannot load the CA certificate {ca_cert}: {exc}",
                suggestion="set UNKEY_CA_CERT to the gateway's certificate "
                "(for `unkey dev up`: .unkey/tls/gateway.crt)",
            ) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _headers(self, admin: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
        token = self.admin_token if admin else self.api_key
        h = dict(extra or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        return h

    def _unreachable(self, exc: Exception) -> Unavailable:
        if isinstance(exc, httpx.ConnectError) and "CERTIFICATE" in str(exc).upper():
            return Unavailable(
                f"TLS verification failed for {self.base_url}: {exc}",
                suggestion="set UNKEY_CA_CERT to the gateway's certificate "
                "(for `unkey dev up`: .unkey/tls/gateway.crt)",
            )
        return Unavailable(
            f"cannot reach the gateway at {self.base_url}: {exc}",
            suggestion="start the local stack with `unkey dev up`, or set UNKEY_API_URL",
        )

    @staticmethod
    def raise_for(resp: httpx.Response) -> None:
        if resp.is_success:
            return
        try:
            body = resp.json()
            err_body = body["error"]
            err = from_dict(err_body)
            rid = body.get("request_id")
        except (ValueError, KeyError, TypeError):
            raise UnkeyError(
                f"gateway answered HTTP {resp.status_code}: {resp.text[:200]}"
            ) from None
        if rid:
            err.details = {**err.details, "request_id": rid}
        raise err

    def request(
        self,
        method: str,
        path: str,
        *,
        admin: bool = False,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            resp = self._http.request(
                method,
                path,
                json=json_body,
                params=params,
                headers=self._headers(admin, headers),
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        except httpx.InvalidURL as exc:  # e.g. an id with control characters
            raise self._bad_path(path, exc) from None
        self.raise_for(resp)
        return resp

    @staticmethod
    def _bad_path(path: str, exc: Exception) -> InvalidInput:
        return InvalidInput(f"cannot request {path!r}: {exc}", suggestion="check the ids given")

    # -- API ------------------------------------------------------------------------------------

    def health(self) -> Json:
        result: Json = self.request("GET", "/healthz").json()
        return result

    def whoami(self) -> Json:
        result: Json = self.request("GET", "/v1/whoami").json()
        return result

    def deploy(self, spec: Json, *, idempotency_key: str | None = None) -> Json:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        result: Json = self.request("POST", "/v1/deploy", json_body=spec, headers=headers).json()
        return result

    def list_deployments(self, *, limit: int = 50, state: str | None = None) -> Json:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        result: Json = self.request("GET", "/v1/deployments", params=params).json()
        return result

    def get_deployment(self, deployment_id: str) -> Json:
        result: Json = self.request("GET", f"/v1/deployments/{deployment_id}").json()
        return result

    def stop_deployment(self, deployment_id: str) -> Json:
        """Stop (tear down) a deployment: ``deployment.state`` is then ``stopping`` (a stop job
        deletes its VMs; follow :meth:`events` until ``stopped``), or ``cancelled``/``stopped``
        when nothing is left to do. Stopping again is harmless."""
        result: Json = self.request("DELETE", f"/v1/deployments/{deployment_id}").json()
        return result

    def events(
        self,
        deployment_id: str,
        *,
        follow: bool = True,
        last_event_id: int | None = None,
        deadline: float | None = None,
    ) -> Iterator[Event]:
        """Yield the deployment's events until the stream's ``end`` event (inclusive).

        With ``deadline`` (a ``time.monotonic()`` value) the stream also ends, without an
        ``end`` event, once the deadline has passed, even while no event comes."""
        headers = self._headers(False)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        url = f"/v1/deployments/{deployment_id}/events"
        # no read timeout otherwise: a deployment may be silent for long (keep-alives aside)
        read = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            with self._http.stream(
                "GET",
                url,
                params={"follow": str(follow).lower()},
                headers=headers,
                timeout=httpx.Timeout(30.0, read=read),
            ) as resp:
                if not resp.is_success:
                    resp.read()
                    self.raise_for(resp)
                ev_id: int | None = None
                ev_name = "message"
                data: list[str] = []
                for line in resp.iter_lines():
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    if line == "":
                        if data:
                            yield Event(ev_id, ev_name, json.loads("\n".join(data)))
                        ev_id, ev_name, data = None, "message", []
                        continue
                    if line.startswith(":"):
                        continue
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "id":
                        ev_id = int(value)
                    elif field == "event":
                        ev_name = value
                    elif field == "data":
                        data.append(value)
        except httpx.ReadTimeout as exc:
            if deadline is not None:
                return  # nothing came before the deadline (the read waited all that was left)
            raise self._unreachable(exc) from None
        except httpx.InvalidURL as exc:
            raise self._bad_path(url, exc) from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def create_key(self, name: str = "default") -> Json:
        result: Json = self.request("POST", "/v1/keys", json_body={"name": name}).json()
        return result

    def list_keys(self) -> Json:
        result: Json = self.request("GET", "/v1/keys").json()
        return result

    def revoke_key(self, key_id: str) -> Json:
        result: Json = self.request("DELETE", f"/v1/keys/{key_id}").json()
        return result

    # -- admin ------------------------------------------------------------------------------------

    def create_customer(
        self,
        name: str,
        *,
        email: str | None = None,
        tenant_id: str | None = None,
        pricing_tier: str | None = None,
        discount_pct: Decimal | None = None,
        credit_balance: Decimal | None = None,
        create_key: bool = True,
    ) -> Json:
        body: Json = {"name": name, "create_key": create_key}
        for k, v in (
            ("email", email),
            ("tenant_id", tenant_id),
            ("pricing_tier", pricing_tier),
            ("discount_pct", discount_pct),
            ("credit_balance", credit_balance),
        ):
            if v is not None:
                body[k] = str(v) if isinstance(v, Decimal) else v
        result: Json = self.request("POST", "/v1/customers", admin=True, json_body=body).json()
        return result

    def update_customer(self, customer_id: str, **changes: Decimal | str | None) -> Json:
        body = {k: str(v) for k, v in changes.items() if v is not None}
        result: Json = self.request(
            "PATCH", f"/v1/customers/{customer_id}", admin=True, json_body=body
        ).json()
        return result

    def list_customers(self) -> Json:
        result: Json = self.request("GET", "/v1/customers", admin=True).json()
        return result

    def get_customer(self, customer_id: str) -> Json:
        result: Json = self.request("GET", f"/v1/customers/{customer_id}", admin=True).json()
        return result

    def list_hosts(self) -> Json:
        result: Json = self.request("GET", "/v1/hosts", admin=True).json()
        return result

    def forget_host(self, host_id: str) -> Json:
        result: Json = self.request("DELETE", f"/v1/hosts/{host_id}", admin=True).json()
        return result
