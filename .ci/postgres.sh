#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests of `hfsqueeze tune --storage` (tests/tune/test_tune_rdb.py).
#   pg_env=$(.ci/postgres.sh start) && eval "$pg_env"   # exports HFSQUEEZE_TEST_PG_URL, HFSQUEEZE_TEST_PG_DIR
#   .ci/postgres.sh stop "$HFSQUEEZE_TEST_PG_DIR"
# PostgreSQL refuses to run as root (CI runs as root): the server then runs as the `postgres` user.
set -euo pipefail

bin_dir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$found" ] && command -v pg_ctl >/dev/null; then found=$(dirname "$(command -v pg_ctl)"); fi
    [ -n "$found" ] || { echo "postgres.sh: no PostgreSQL server found (install the postgresql package)" >&2; exit 1; }
    echo "$found"
}

as_owner() {  # run a command as the user owning the data directory
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
start)
    bin=$(bin_dir)
    dir=$(mktemp -d /tmp/hfsqueeze-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U hfsqueeze --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    echo "export HFSQUEEZE_TEST_PG_URL=postgresql://hfsqueeze@127.0.0.1:$port/postgres HFSQUEEZE_TEST_PG_DIR=$dir"
    ;;
stop)
    dir=${2:?usage: postgres.sh stop DIR}
    bin=$(bin_dir)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start | stop DIR" >&2
    exit 2
    ;;
esac
