#!/usr/bin/env bash
# Benchmark wsgirun's daemon mode against its embedded mode and against Apache with
# mod_wsgi in daemon mode, in one run on this machine, and print the results as Markdown.
#
# Usage: bench/daemon.sh
#   Progress goes to stderr. The results go to stdout and to bench/results/daemon.md.
#   With the default settings one run takes about seven minutes.
#
# What runs, each server alone on a loopback port, with examples/hello/app.wsgi:
#   - wsgirun embedded, 2 isolates (--threads 2);
#   - wsgirun daemon mode, processes=2 with threads=1 (2 isolates, as embedded) and with
#     threads=15 (mod_wsgi's default);
#   - Apache 2.4 event MPM with mod_wsgi 4.9 (Debian bookworm), WSGIDaemonProcess
#     processes=2 threads=15, from a private configuration on a loopback port.
#   Each gets BENCH_WARMUP seconds of load, then BENCH_PASSES runs of wrk -t2 -c64 for
#   BENCH_DURATION seconds; the median requests/s and its p99 latency are reported.
#   Then 1 GiB goes up (curl, Content-Length) and 1 GiB comes down through a wsgirun
#   daemon, while the resident memory of the front and of the daemon processes is sampled.
#   A 64 MiB upload and download run first, so that the interpreters' wasm heaps have
#   grown to their working size (wasm memory never shrinks) before the measurement.
#
# Environment:
#   DENO            deno binary that runs wsgirun (default: deno on PATH). Give the real
#                   binary, not the Node shim of the npm package in node_modules/.bin.
#   WSGIRUN_CACHE   cache folder (default: .cache in the repository root). Apache and
#                   mod_wsgi are unpacked into $WSGIRUN_CACHE/bench-daemon.
#   BENCH_PORT      loopback TCP port of the servers (default: 18571)
#   BENCH_DURATION  seconds of each wrk measurement (default: 10)
#   BENCH_WARMUP    seconds of load before the measurements, not recorded (default: 5)
#   BENCH_PASSES    wrk measurements per server; the median is reported (default: 3)
#
# Apache is not installed on the system: its Debian packages are downloaded with
# `apt-get download`, unpacked with `dpkg-deb -x`, and run from there with
# LD_LIBRARY_PATH, so no system service starts. mod_wsgi needs the system's
# libpython3.11 (Debian's python3.11 package). wrk and curl must be installed.
#
# Run as root, the daemon processes of wsgirun run as nobody (a daemon never runs as
# root), and so do Apache's children and mod_wsgi's daemons.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
CACHE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")"
BENCH_CACHE="$CACHE_DIR/bench-daemon"
APACHE_ROOT="$BENCH_CACHE/root"
RESULTS_FILE="$SCRIPT_DIR/results/daemon.md"
HELLO="$REPO_ROOT/examples/hello/app.wsgi"
UPLOAD_APP="$REPO_ROOT/tests/fixtures/daemon_site/app.wsgi"

PORT="${BENCH_PORT:-18571}"
DURATION="${BENCH_DURATION:-10}"
WARMUP="${BENCH_WARMUP:-5}"
PASSES="${BENCH_PASSES:-3}"

START_TIMEOUT_S=180
TRANSFER_TIMEOUT_S=600
TRANSFER_BYTES=1073741824
APACHE_PACKAGES=(apache2-bin libapr1 libaprutil1 libaprutil1-dbd-sqlite3 libaprutil1-ldap liblua5.3-0 libapache2-mod-wsgi-py3)

# Process ids this script started and has not stopped yet; the exit trap stops them.
RUNNING_PIDS=()
# A private folder for configurations, logs, sockets and the transfer file.
WORK_DIR=""

log() {
  echo "bench: $*" >&2
}

fail() {
  log "error: $*"
  exit 1
}

require_tool() {
  command -v "$1" >/dev/null 2>&1 || fail "'$1' not found; $2"
}

find_deno() {
  if [[ -n "${DENO:-}" ]]; then
    [[ -x "$DENO" ]] || fail "DENO is '$DENO', which is not an executable; set DENO to the deno binary"
    echo "$DENO"
  elif command -v deno >/dev/null 2>&1; then
    command -v deno
  else
    fail "deno not found on PATH; set DENO to the path of the deno binary"
  fi
}

check_settings() {
  local name value
  for name in PORT DURATION WARMUP PASSES; do
    value="${!name}"
    [[ "$value" =~ ^[0-9]+$ && "$value" -gt 0 ]] || fail "BENCH_$name is '$value'; set it to a positive integer"
  done
}

# ---------------------------------------------------------------------------
# Apache and mod_wsgi

# Uses the system's Apache when apache2 and mod_wsgi are installed (bench/run.sh installs
# them), else unpacks the Debian packages privately. Sets APACHE_ROOT ("" for the system).
fetch_apache() {
  if [[ -x /usr/sbin/apache2 && -f /usr/lib/apache2/modules/mod_wsgi.so ]]; then
    APACHE_ROOT=""
    return
  fi
  if [[ -x "$APACHE_ROOT/usr/sbin/apache2" && -f "$APACHE_ROOT/usr/lib/apache2/modules/mod_wsgi.so" ]]; then
    return
  fi
  require_tool apt-get "this script downloads Debian's apache2 and libapache2-mod-wsgi-py3 with apt-get"
  local download="$BENCH_CACHE/debs"
  mkdir -p "$download" "$APACHE_ROOT"
  log "downloading ${APACHE_PACKAGES[*]}"
  # As root, apt downloads as the _apt user, which may not write here; -o fixes that.
  (cd "$download" && apt-get -o APT::Sandbox::User=root download "${APACHE_PACKAGES[@]}" >"$BENCH_CACHE/apt.log" 2>&1) ||
    fail "apt-get download failed (see $BENCH_CACHE/apt.log); run 'apt-get update' and this script again"
  local deb
  for deb in "$download"/*.deb; do
    dpkg-deb -x "$deb" "$APACHE_ROOT" || fail "dpkg-deb -x $deb failed; delete $BENCH_CACHE and run again"
  done
}

apache_env() {
  env LD_LIBRARY_PATH="$APACHE_ROOT/usr/lib/x86_64-linux-gnu" "$@"
}

write_apache_config() {
  local modules="$APACHE_ROOT/usr/lib/apache2/modules"
  local user_lines=""
  if [[ "$EUID" -eq 0 ]]; then
    user_lines=$'User nobody\nGroup nogroup'
  fi
  cat >"$WORK_DIR/apache.conf" <<EOF
ServerRoot "$WORK_DIR"
ServerName 127.0.0.1
Listen 127.0.0.1:$PORT
PidFile "$WORK_DIR/apache.pid"
ErrorLog "$WORK_DIR/apache-error.log"
LogLevel warn
$user_lines
LoadModule mpm_event_module "$modules/mod_mpm_event.so"
LoadModule authz_core_module "$modules/mod_authz_core.so"
LoadModule wsgi_module "$modules/mod_wsgi.so"
# Enough workers that Apache's side never queues the 64 connections of wrk.
StartServers 2
ThreadsPerChild 64
MaxRequestWorkers 128
KeepAlive On
MaxKeepAliveRequests 0
WSGISocketPrefix "$WORK_DIR/wsgi"
WSGIDaemonProcess hello processes=2 threads=15 display-name=%{GROUP}
WSGIScriptAlias / "$HELLO" process-group=hello application-group=%{GLOBAL}
<Directory "$(dirname "$HELLO")">
  Require all granted
</Directory>
EOF
}

apache_version() {
  apache_env "$APACHE_ROOT/usr/sbin/apache2" -v 2>/dev/null | sed -n 's/^Server version: //p'
}

# ---------------------------------------------------------------------------
# Processes

is_alive() {
  kill -0 "$1" 2>/dev/null
}

forget_pid() {
  local keep=() pid
  for pid in "${RUNNING_PIDS[@]}"; do
    [[ "$pid" == "$1" ]] || keep+=("$pid")
  done
  RUNNING_PIDS=("${keep[@]}")
}

# Sends SIGTERM, waits up to 15 seconds, then sends SIGKILL.
stop_pid() {
  local pid=$1 i
  is_alive "$pid" || { forget_pid "$pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    is_alive "$pid" || break
    sleep 0.1
  done
  if is_alive "$pid"; then
    log "process $pid did not stop within 15 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

cleanup() {
  local pid
  for pid in "${RUNNING_PIDS[@]}"; do stop_pid "$pid"; done
  if [[ -n "$WORK_DIR" && -f "$WORK_DIR/apache.pid" ]]; then
    pid="$(cat "$WORK_DIR/apache.pid" 2>/dev/null || true)"
    [[ -n "$pid" ]] && stop_pid "$pid"
  fi
  [[ -n "$WORK_DIR" ]] && rm -rf "$WORK_DIR"
}

# Waits until the server returns 200 for / or fails after START_TIMEOUT_S.
wait_for_server() {
  local pid=$1 deadline=$((SECONDS + START_TIMEOUT_S))
  until [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/" 2>/dev/null || true)" == 200 ]]; do
    [[ -z "$pid" ]] || is_alive "$pid" || fail "the server (pid $pid) exited before it answered; see its log in $WORK_DIR"
    ((SECONDS < deadline)) || fail "the server did not answer within $START_TIMEOUT_S s"
    sleep 0.2
  done
}

start_wsgirun() {
  local name=$1
  shift
  "$DENO" run --allow-all --config "$REPO_ROOT/deno.json" "$REPO_ROOT/main.ts" "$@" --port "$PORT" \
    >"$WORK_DIR/$name.out" 2>"$WORK_DIR/$name.log" &
  SERVER_PID=$!
  RUNNING_PIDS+=("$SERVER_PID")
  wait_for_server "$SERVER_PID"
}

start_apache() {
  apache_env "$APACHE_ROOT/usr/sbin/apache2" -f "$WORK_DIR/apache.conf" -k start ||
    fail "apache2 failed to start; see $WORK_DIR/apache-error.log"
  wait_for_server ""
}

stop_apache() {
  local pid
  pid="$(cat "$WORK_DIR/apache.pid" 2>/dev/null || true)"
  [[ -n "$pid" ]] && stop_pid "$pid"
  rm -f "$WORK_DIR/apache.pid"
}

# The option that runs a group's daemons as nobody when this script runs as root.
daemon_user() {
  [[ "$EUID" -eq 0 ]] && echo ",user=nobody" || true
}

child_pids() {
  pgrep -P "$1" 2>/dev/null || true
}

rss_kb() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

# ---------------------------------------------------------------------------
# Measurements

# Prints "requests/s p99_ms" of one wrk run.
wrk_once() {
  local output rate p99
  output="$(wrk -t2 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/")"
  rate="$(awk '/^Requests\/sec:/ { printf "%d", $2 }' <<<"$output")"
  p99="$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } printf "%.1f", v }' <<<"$output")"
  grep -q "Non-2xx" <<<"$output" && log "warning: wrk saw non-2xx responses: $(grep Non-2xx <<<"$output")"
  echo "$rate $p99"
}

# Prints "median_rate p99_of_that_pass all_rates".
measure_throughput() {
  wrk -t2 -c64 -d"${WARMUP}s" "http://127.0.0.1:$PORT/" >/dev/null
  local results=() i
  for ((i = 0; i < PASSES; i++)); do
    results+=("$(wrk_once)")
  done
  local sorted median
  sorted="$(printf '%s\n' "${results[@]}" | sort -n)"
  median="$(sed -n "$(((PASSES + 1) / 2))p" <<<"$sorted")"
  echo "$median $(printf '%s\n' "${results[@]}" | awk '{ print $1 }' | paste -sd/)"
}

# Samples the RSS of the server and its daemon processes while a command runs; prints
# "seconds front_growth_mb daemon_growth_mb", the growth of each maximum over its start.
measure_transfer() {
  local server=$1
  shift
  local daemons front_start front_peak daemon_start daemon_peak rss pid started
  daemons="$(child_pids "$server")"
  front_start="$(rss_kb "$server")"
  front_peak=$front_start
  daemon_start=0
  for pid in $daemons; do daemon_start=$((daemon_start + $(rss_kb "$pid"))); done
  daemon_peak=$daemon_start
  started=$(date +%s.%N)
  "$@" &
  local client=$!
  while is_alive "$client"; do
    rss="$(rss_kb "$server")"
    ((rss > front_peak)) && front_peak=$rss
    rss=0
    for pid in $daemons; do rss=$((rss + $(rss_kb "$pid"))); done
    ((rss > daemon_peak)) && daemon_peak=$rss
    sleep 0.2
  done
  wait "$client" || fail "the transfer failed: $*"
  local seconds
  seconds="$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')"
  echo "$seconds $(((front_peak - front_start) / 1024)) $(((daemon_peak - daemon_start) / 1024))"
}

# upload_once [FILE BYTES]: POSTs the transfer file (or FILE of BYTES bytes).
upload_once() {
  local file="${1:-$WORK_DIR/transfer.bin}" bytes="${2:-$TRANSFER_BYTES}" answer
  answer="$(curl -s --max-time "$TRANSFER_TIMEOUT_S" -H "Expect:" -X POST --upload-file "$file" \
    "http://127.0.0.1:$PORT/do/upload")"
  [[ "$answer" == "$bytes" ]] || fail "the upload returned '$answer', expected $bytes"
}

# download_once [BYTES]: GETs BYTES (default: the transfer size) and checks the size.
download_once() {
  local bytes="${1:-$TRANSFER_BYTES}" size
  size="$(curl -s --max-time "$TRANSFER_TIMEOUT_S" -o /dev/null -w '%{size_download}' \
    "http://127.0.0.1:$PORT/do/download?size=$bytes")"
  [[ "$size" == "$bytes" ]] || fail "the download returned $size bytes, expected $bytes"
}

# ---------------------------------------------------------------------------
# Main

main() {
  check_settings
  DENO="$(find_deno)"
  require_tool wrk "install it with 'apt-get install wrk'"
  require_tool curl "install it with 'apt-get install curl'"
  [[ "$(uname -s)" == Linux ]] || fail "this script reads /proc and runs Debian packages; run it on Debian Linux"
  mkdir -p "$BENCH_CACHE" "$(dirname "$RESULTS_FILE")"
  fetch_apache
  WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/wsgirun-bench-daemon.XXXXXX")"
  # Apache's children and mod_wsgi's daemons run as nobody and use sockets in here.
  chmod 755 "$WORK_DIR"
  trap cleanup EXIT
  write_apache_config

  local user rows=()
  user="$(daemon_user)"
  local embedded daemon1 daemon15 apache
  log "wsgirun embedded, 2 isolates"
  start_wsgirun embedded "$HELLO" --threads 2
  embedded="$(measure_throughput)"
  stop_pid "$SERVER_PID"

  log "wsgirun daemon, processes=2 threads=1"
  start_wsgirun daemon1 "$HELLO" --daemon "group=hello,processes=2,threads=1$user"
  daemon1="$(measure_throughput)"
  stop_pid "$SERVER_PID"

  log "wsgirun daemon, processes=2 threads=15"
  start_wsgirun daemon15 "$HELLO" --daemon "group=hello,processes=2,threads=15$user"
  daemon15="$(measure_throughput)"
  stop_pid "$SERVER_PID"

  log "Apache + mod_wsgi daemon, processes=2 threads=15"
  start_apache
  apache="$(measure_throughput)"
  stop_apache

  log "1 GiB upload and download through a wsgirun daemon"
  head -c "$TRANSFER_BYTES" /dev/zero >"$WORK_DIR/transfer.bin"
  head -c $((64 * 1024 * 1024)) /dev/zero >"$WORK_DIR/warmup.bin"
  start_wsgirun transfer "$UPLOAD_APP" --daemon "group=site,processes=2,threads=1,request-timeout=600$user"
  local i
  for ((i = 0; i < 2; i++)); do
    upload_once "$WORK_DIR/warmup.bin" $((64 * 1024 * 1024))
    download_once $((64 * 1024 * 1024))
  done
  local upload download
  upload="$(measure_transfer "$SERVER_PID" upload_once)"
  download="$(measure_transfer "$SERVER_PID" download_once)"
  stop_pid "$SERVER_PID"
  rm -f "$WORK_DIR/transfer.bin"

  local embedded_rate
  embedded_rate="$(awk '{ print $1 }' <<<"$embedded")"
  row() {
    local label=$1 result=$2
    read -r rate p99 passes <<<"$result"
    local ratio
    ratio="$(awk -v r="$rate" -v e="$embedded_rate" 'BEGIN { printf "%.2f", r / e }')"
    echo "| $label | $rate | $ratio | $p99 | $passes |"
  }
  {
    echo "### Daemon mode, $(date -u +%Y-%m-%d), $(nproc) cores"
    echo
    echo "hello world (examples/hello/app.wsgi), wrk -t2 -c64 -d${DURATION}s on the same machine, median of $PASSES passes after ${WARMUP} s of warm-up."
    echo
    echo "| server | requests/s | × embedded | p99 ms | passes |"
    echo "|---|---|---|---|---|"
    row "wsgirun embedded, 2 isolates" "$embedded"
    row "wsgirun daemon, processes=2 threads=1" "$daemon1"
    row "wsgirun daemon, processes=2 threads=15" "$daemon15"
    row "$(apache_version) + mod_wsgi 4.9 daemon, processes=2 threads=15" "$apache"
    echo
    read -r up_s up_front up_daemons <<<"$upload"
    read -r down_s down_front down_daemons <<<"$download"
    echo "1 GiB through a wsgirun daemon group (processes=2, threads=1), curl on loopback, after two 64 MiB transfers each way; growth of the resident memory (summed over the daemon processes) over its value before the transfer:"
    echo
    echo "| transfer | seconds | front RSS growth MB | daemons' RSS growth MB |"
    echo "|---|---|---|---|"
    echo "| upload (Content-Length), read by wsgi.input in 64 KiB pieces | $up_s | $up_front | $up_daemons |"
    echo "| download, 64 KiB chunks from the application | $down_s | $down_front | $down_daemons |"
  } | tee "$RESULTS_FILE"
}

main "$@"
