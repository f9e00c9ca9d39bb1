"""``make demo``: the whole journey on the embedded defaults, each step said before it runs.

1. start the local stack (``unkey dev up``: nats-server, registry, gatewayd with the billing
   service, builderd, metald with metering, deployer);
2. assemble the example image (examples/hello) and push it to the local registry;
3. create a customer and its API key;
4. ``unkey deploy examples/app.yaml --wait`` (build, asset, schedule, boot, health check);
5. fetch the app's page from inside its VM;
6. let metrics flow (one 60 s batch of 600 samples per VM), then show usage and the bill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
UNKEY = str(Path(sys.executable).parent / "unkey")


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(*args: str, env: dict[str, str] | None = None, capture: bool = False) -> str:
    print("$ unkey " + " ".join(args), flush=True)
    proc = subprocess.run(
        [UNKEY, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE if capture else None,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"demo: `unkey {' '.join(args)}` failed with exit {proc.returncode}")
    return proc.stdout or ""


def main() -> int:
    os.chdir(REPO)
    from ..core.config import load  # noqa: PLC0415
    from .example import push_hello  # noqa: PLC0415 (keeps `--help` fast)
    from .stack import REGISTRY_PORT, registry_host  # noqa: PLC0415

    say("starting the local stack (unkey dev up)")
    run("dev", "up")
    run("dev", "status")

    say("assembling the example image from examples/hello and pushing it to the local registry")
    registry = registry_host(load(environ=os.environ))
    ref = push_hello(registry, REPO / "examples" / "hello" / "www")
    print(f"pushed {ref}")
    app_yaml = "examples/app.yaml"
    if registry != f"127.0.0.1:{REGISTRY_PORT}":
        # port 5055 was taken when the stack first started: point a copy of the example at ours
        copy = Path(".unkey") / "demo" / "app.yaml"
        copy.parent.mkdir(parents=True, exist_ok=True)
        text = (REPO / app_yaml).read_text()
        copy.write_text(text.replace(f"127.0.0.1:{REGISTRY_PORT}", registry))
        app_yaml = str(copy)
        print(f"the registry listens on {registry}: deploying {app_yaml}")

    say("creating a customer and its first API key (shown once)")
    out = json.loads(run("customers", "create", f"demo-{int(time.time())}", "--json", capture=True))
    key = out.get("secret") or out.get("api_key", {}).get("secret")
    if not key:
        raise SystemExit(f"demo: no API key in {out}")
    env = {"UNKEY_API_KEY": key}
    print(f"customer {out.get('customer', out).get('id', '?')}")

    say(f"validating and deploying {app_yaml} (progress streams from gatewayd)")
    run("validate", app_yaml)
    dep = json.loads(run("deploy", app_yaml, "--wait", "--json", env=env, capture=True))
    url = dep.get("url") or dep.get("deployment", {}).get("url")
    print(f"deployment {dep.get('id', dep.get('deployment', {}).get('id'))} running at {url}")

    say(f"asking the app inside its VM: GET {url}/")
    r = httpx.get(f"{url}/", timeout=10)
    print(f"HTTP {r.status_code}")
    print(r.text.strip()[:400])

    say("letting metrics flow: the VM is sampled every 100 ms, billaged sends 60 s batches")
    for left in range(70, 0, -10):
        print(f"  {left} s ...", flush=True)
        time.sleep(10)

    say("usage so far (from ClickHouse, embedded chDB)")
    run("usage", env=env)
    say("the running bill for this month")
    run("bill", env=env)

    say("done. Where to look:")
    print("  https://127.0.0.1:8443/dashboard   # web dashboard: log in with the API key above")
    print(f"    (API key: {key})")
    print("  unkey dev status              # every service, its pid and log file")
    print("  .unkey/logs/                  # JSON logs (grep a request_id to follow a deploy)")
    print(f"  {url}/                        # the app")
    print("  unkey deployments ls          # with UNKEY_API_KEY set as above")
    print("  unkey deployments stop ID     # delete the app's VMs (billing stops with them)")
    print("  unkey dev down [--purge-vms]  # stop the stack (VMs keep running unless purged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
