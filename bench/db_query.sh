#!/usr/bin/env bash
# Benchmark a Flask view that runs one PostgreSQL query per request through pg8000:
# wsgirun (Pyodide, Python 3.12) against gunicorn on the host's native CPython, with the
# same Flask, pg8000 and database, in one run.
#
# Usage: bench/db_query.sh
#   Progress goes to stderr; the results table goes to stdout and to
#   bench/results/db_query.md.
#
# Needs: the PostgreSQL server of tests/services.sh (started here when it is not running),
# Debian's Flask and pg8000 (examples/fetch_packages.sh, tests/fetch_drivers.sh), wrk, and
# gunicorn, which is downloaded with `apt-get download` and unpacked, never installed.
#
# Environment:
#   BENCH_DURATION  seconds of each wrk measurement (default: 10)
#   PYTHON          Python that runs gunicorn (default: /usr/bin/python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")"
GUNICORN_ROOT="$CACHE_DIR/bench-db/gunicorn"
RESULTS_FILE="$REPO_ROOT/bench/results/db_query.md"
DURATION="${BENCH_DURATION:-10}"
PYTHON="${PYTHON:-/usr/bin/python3}"
DENO="${DENO:-$(command -v deno || true)}"
PORT=18700
CONNECTIONS=64

log() {
  echo "db_query: $*" >&2
}

fail() {
  log "error: $*"
  exit 1
}

fetch_gunicorn() {
  [[ -f "$GUNICORN_ROOT/usr/lib/python3/dist-packages/gunicorn/__init__.py" ]] && return 0
  mkdir -p "$CACHE_DIR/bench-db/debs" "$GUNICORN_ROOT"
  local options=()
  [[ "$EUID" -eq 0 ]] && options+=(-o APT::Sandbox::User=root)
  (cd "$CACHE_DIR/bench-db/debs" && apt-get "${options[@]}" download gunicorn python3-gunicorn) >&2 ||
    fail "apt-get download gunicorn failed; run 'apt-get update' and try again"
  local deb
  for deb in "$CACHE_DIR"/bench-db/debs/*.deb; do dpkg-deb -x "$deb" "$GUNICORN_ROOT"; done
}

# Fills the table the view reads, from the host's Python with the same pg8000.
prepare_table() {
  PYTHONPATH="$DRIVERS" "$PYTHON" - <<'PY'
import pg8000

connection = pg8000.connect(host="127.0.0.1", port=55432, user="wsgirun", password="wsgirun", database="wsgirun")
cursor = connection.cursor()
cursor.execute("DROP TABLE IF EXISTS bench_items")
cursor.execute("CREATE TABLE bench_items (id integer PRIMARY KEY, name text NOT NULL)")
cursor.execute("INSERT INTO bench_items SELECT n, 'item ' || n FROM generate_series(1, 1000) AS n")
connection.commit()
connection.close()
PY
}

wait_for_port() {
  local attempt
  for attempt in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/item" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "no answer on port $PORT within 60 s"
}

# Runs wrk against the server on $PORT and prints "requests/s p99_ms errors".
measure() {
  wrk -t2 -c"$CONNECTIONS" -d1s "http://127.0.0.1:$PORT/item" >/dev/null 2>&1 || true
  local output
  output="$(wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/item")"
  local rate p99 errors
  rate="$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$output")"
  p99="$(awk '$1 == "99%" {print $2}' <<<"$output")"
  errors="$(awk '/Non-2xx|Socket errors/ {n += $NF} END {print n + 0}' <<<"$output")"
  echo "$rate $p99 $errors"
}

# Starts a server in the background, measures it, stops it and prints one table row.
run_server() {
  local name="$1"
  shift
  log "measuring $name"
  "$@" >"$CACHE_DIR/bench-db/$name.log" 2>&1 &
  local pid=$!
  wait_for_port
  local result
  result="$(measure)"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  read -r rate p99 errors <<<"$result"
  echo "| $name | $rate | $p99 | $errors |"
}

main() {
  command -v wrk >/dev/null || fail "wrk not found; install it with 'apt-get install -y wrk'"
  bash "$REPO_ROOT/tests/services.sh" start >&2
  FRAMEWORKS="$(bash "$REPO_ROOT/examples/fetch_packages.sh")"
  DRIVERS="$(bash "$REPO_ROOT/tests/fetch_drivers.sh")"
  fetch_gunicorn
  prepare_table

  local pylib="$REPO_ROOT/tests/fixtures/realapp_pylib"
  local gunicorn_path="$GUNICORN_ROOT/usr/lib/python3/dist-packages:$FRAMEWORKS:$DRIVERS"
  local rows=()
  rows+=("$(run_server "wsgirun, 2 isolates (Python 3.12, Pyodide)" \
    "$DENO" run --allow-all --config "$REPO_ROOT/deno.json" "$REPO_ROOT/main.ts" \
    "$REPO_ROOT/bench/db_query_app.py" --port "$PORT" --threads 2 --python 3.12 \
    --python-path "$FRAMEWORKS" --python-path "$DRIVERS" --python-path "$pylib" \
    --allow-net 127.0.0.1:55432)")
  rows+=("$(run_server "gunicorn gthread, 2 workers x 15 threads (native)" \
    env PYTHONPATH="$gunicorn_path" "$PYTHON" -m gunicorn --chdir "$REPO_ROOT/bench" \
    --bind "127.0.0.1:$PORT" --workers 2 --threads 15 --worker-class gthread db_query_app:application)")
  rows+=("$(run_server "gunicorn sync, 2 workers (native)" \
    env PYTHONPATH="$gunicorn_path" "$PYTHON" -m gunicorn --chdir "$REPO_ROOT/bench" \
    --bind "127.0.0.1:$PORT" --workers 2 db_query_app:application)")

  mkdir -p "$(dirname "$RESULTS_FILE")"
  {
    echo "Flask 2.2 view, one \`SELECT\` by primary key through pg8000 1.10.6 per request,"
    echo "PostgreSQL 15 on loopback; wrk -t2 -c$CONNECTIONS for ${DURATION} s after 1 s of warm-up."
    echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, native Python $("$PYTHON" -c 'import platform; print(platform.python_version())')."
    echo
    echo "| server | requests/s | p99 latency | errors |"
    echo "|---|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
  } | tee "$RESULTS_FILE"
}

main "$@"
