"""gatewayd throughput: authenticated POST /v1/deploy under load from a separate process.

Starts a real gatewayd (HTTPS, SQLite WAL, rate limits raised out of the way), creates keys, then
loads it from another process: ``wrk`` (Debian package; keys rotate per request through a Lua
script) when installed, else an async httpx generator (which saturates before the server does).
First ``GET /healthz`` (the baseline: TLS + HTTP + middleware, no auth, no database), then
``POST /v1/deploy`` (auth, validation, one transaction inserting deployment + event + job).

    .venv/bin/python bench/gateway.py [--duration 10] [--concurrency 16] [--generator wrk|httpx]

Last line: ``RESULT rps=... p50_ms=... p99_ms=... baseline_rps=... goal_rps=1000 goal_p99_ms=50``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SPEC = {
    "name": "bench",
    "image": "ghcr.io/acme/bench:1.0",
    "resources": {"cpu": 1, "memory": "256MiB"},
    "port": 8080,
    "env": {"MODE": "bench"},
}


async def _load(  # noqa: PLR0917
    url: str, ca: str, keys: list[str], path: str, duration: float, concurrency: int
) -> dict[str, float]:
    import httpx

    from unkey_deploy.gateway.tls import client_context

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, verify=client_context(ca), limits=limits, timeout=30
    ) as client:

        async def worker(i: int, stop: float) -> None:
            nonlocal errors
            headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if path == "/healthz":
                    r = await client.get(path)
                else:
                    r = await client.post(path, json=SPEC, headers=headers)
                latencies.append(time.perf_counter() - t0)
                if r.status_code not in (200, 202):
                    errors += 1

        warm = time.perf_counter() + min(2.0, duration / 5)
        await asyncio.gather(*(worker(i, warm) for i in range(concurrency)))
        latencies.clear()
        errors = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker(i, start + duration) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


def _wrk(  # noqa: PLR0917
    url: str, keys: list[str], path: str, duration: float, concurrency: int, tmp: Path
) -> dict[str, float]:
    import re
    import shutil

    body = json.dumps(SPEC).replace("\\", "\\\\").replace("'", "\\'")
    lua = tmp / "deploy.lua"
    lua.write_text(
        "local keys = {" + ",".join(f'"{k}"' for k in keys) + "}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  local h = {["Content-Type"] = "application/json", '
        '["Authorization"] = "Bearer " .. keys[(i % #keys) + 1]}\n'
        f"  return wrk.format('POST', nil, h, '{body}')\n"
        "end\n"
    )
    argv = [shutil.which("wrk") or "wrk", "-t1", f"-c{concurrency}", f"-d{duration:.0f}s"]
    argv += ["--latency", "--timeout", "10s"]
    if path != "/healthz":
        argv += ["-s", str(lua)]
    # Warm up (connections, caches), then measure.
    subprocess.run([*argv[:3], "-d2s", url + path], capture_output=True, check=True)
    out = subprocess.run([*argv, url + path], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([0-9.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(total.group(1)) if total else 0,
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(x) for x in sock.groups()) if sock else 0),
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
    }


def load_main(argv: list[str]) -> None:
    url, ca, keys_file, path, duration, concurrency = argv
    keys = json.loads(Path(keys_file).read_text())
    res = asyncio.run(_load(url, ca, keys, path, float(duration), int(concurrency)))
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--generator", choices=("wrk", "httpx"), default=None)
    args = ap.parse_args()
    import shutil

    generator = args.generator or ("wrk" if shutil.which("wrk") else "httpx")

    from unkey_deploy.testing.gateway import running_gateway

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_gateway(Path(tmp) / "gw", rate_limit_per_s=1e6, rate_limit_burst=1_000_000) as gw,
    ):
        with gw.client() as c:
            keys = [c.create_customer(f"bench-{i}")["secret"] for i in range(args.keys)]
        keys_file = Path(tmp) / "keys.json"
        keys_file.write_text(json.dumps(keys))
        results = {}
        for name, path in (("baseline", "/healthz"), ("deploy", "/v1/deploy")):
            if generator == "wrk":
                results[name] = _wrk(gw.url, keys, path, args.duration, args.concurrency, Path(tmp))
            else:
                out = subprocess.run(
                    [sys.executable, __file__, "--load", gw.url, str(gw.ca_cert),
                     str(keys_file), path, str(args.duration), str(args.concurrency)],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                results[name] = json.loads(out.strip().splitlines()[-1])
            r = results[name]
            print(
                f"{name:>8} {path:<12} {r['requests']:>7} req  {r['rps']:8.1f} req/s  "
                f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  errors {r['errors']}"
            )
    d, b = results["deploy"], results["baseline"]
    print(
        f"RESULT rps={d['rps']:.0f} p50_ms={d['p50_ms']:.1f} p99_ms={d['p99_ms']:.1f} "
        f"errors={d['errors']} baseline_rps={b['rps']:.0f} baseline_p99_ms={b['p99_ms']:.1f} "
        f"concurrency={args.concurrency} generator={generator} goal_rps=1000 goal_p99_ms=50"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2:])
    else:
        main()
