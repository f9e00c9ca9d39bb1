#!/usr/bin/env bash
# `make test`: lint, typecheck, then the whole suite in parallel, with the services it needs.
# Starts a throwaway PostgreSQL on 127.0.0.1 (the store suite runs against SQLite and PostgreSQL);
# the tests themselves start nats-server, docker-registry, S3 and the platform's own services.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

echo "== ruff" >&2
$BIN/ruff check src tests bench scripts
echo "== mypy" >&2
$BIN/mypy

PGROOT=$(mktemp -d /tmp/unkey-test-pg.XXXXXX)
cleanup() { bash scripts/postgres.sh stop "$PGROOT" || true; rm -rf "$PGROOT"; }
trap cleanup EXIT
UNKEY_TEST_POSTGRES_URL=$(bash scripts/postgres.sh start "$PGROOT")
export UNKEY_TEST_POSTGRES_URL
export UNKEY_NATIVE_DIR="$PWD/.native"

echo "== pytest" >&2
$BIN/pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
