#!/usr/bin/env bash
# postgres.sh start DIR  -> prints a SQLAlchemy URL for a fresh cluster on 127.0.0.1
# postgres.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
run() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case $cmd in
start)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$dir/data" "$dir/run"
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir" && chmod 755 "$dir"
  run "$PGBIN/initdb" -D "$dir/data" -U unkey --auth=trust -E UTF8 >/dev/null
  run "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/run -c fsync=off -c max_connections=200" start >/dev/null
  run "$PGBIN/createdb" -h 127.0.0.1 -p "$port" -U unkey unkey
  echo "postgresql+psycopg://unkey@127.0.0.1:$port/unkey"
  ;;
stop)
  [ -d "$dir/data" ] && run "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  ;;
esac
