#!/usr/bin/env bash
# Benchmark wsgirun against gunicorn and Apache mod_wsgi on this machine and print the
# results as Markdown.
#
# Usage: bench/run.sh   (or: deno task bench)
#   Progress goes to stderr. The results go to stdout and to bench/results/latest.md.
#   On an idle 2-core machine one run took 13 minutes (BENCHMARKS.md), where the
#   durations below add up to about eight: the load waits and the repeated
#   measurements described below take the rest, and more under other jobs.
#
# What runs, each server alone on loopback:
#   - examples/hello/app.wsgi under wsgirun (2 isolates, Python 3.14), gunicorn (gthread
#     2 workers x 15 threads, sync 2 workers) and Apache with mod_wsgi in embedded mode
#     (mpm_event, 2 processes x 15 threads, see bench/apache.sh);
#   - the template page of examples/flask/app.wsgi under wsgirun (2 isolates, Python 3.12)
#     and the same three native setups;
#   - for each: the time from start to first response (wsgirun BENCH_STARTS times with an
#     empty snapshot cache, then BENCH_STARTS times with the cache filled; the native
#     servers BENCH_STARTS times), then wrk at 64 and at 1 connection;
#   - wsgirun hello with 1, 2, 4 and 8 isolates: the restore time of each isolate and the
#     RSS of the deno process once all are ready;
#   - the request path: bench/request_path.ts (Deno.serve alone, and with a worker round
#     trip by postMessage or through the inbox) and wsgirun hello with 1 isolate under the same wrk load, and the adapter's
#     own cost per request inside Pyodide (bench/adapter_cost.ts);
#   - the server's RSS during a 1 GiB upload through wsgi.input to bench/upload_app.wsgi.
#
# Machine load: before each measurement the script waits up to BENCH_LOAD_WAIT seconds
# for the 1-minute load average to drop to BENCH_MAX_LOAD. A wrk measurement that still
# started above it runs once more and the second one is reported. Every figure is
# printed with the load average before it.
#
# Environment:
#   DENO            deno binary that runs wsgirun (default: deno on PATH). Give the real
#                   binary, not the Node shim of the npm package in node_modules/.bin.
#   PYTHON          Python that runs gunicorn (default: /usr/bin/python3, else python3 on PATH)
#   APACHE_BIN      apache2 binary (default: /usr/sbin/apache2)
#   WSGIRUN_CACHE   cache folder, shared with examples/fetch_packages.sh (default: .cache in
#                   the repository root). gunicorn is unpacked into $WSGIRUN_CACHE/bench.
#   BENCH_PORT      first of the two loopback TCP ports used (default: 18471)
#   BENCH_DURATION  seconds of each wrk measurement (default: 10)
#   BENCH_WARMUP    seconds of load before each measurement, not recorded (default: 3)
#   BENCH_STARTS    timed starts per server setup and snapshot cache state; the median is
#                   reported (default: 3)
#   BENCH_MAX_LOAD  1-minute load average above which a measurement runs again (default: 1.5)
#   BENCH_LOAD_WAIT max seconds to wait for the load to drop before each measurement
#                   (default: 10)
#
# Tools: wrk is installed with `apt-get install -y wrk` when it is missing, and Apache and
# mod_wsgi with `apt-get install -y apache2 libapache2-mod-wsgi-py3`. They are needed
# only for benchmarks, never by wsgirun. gunicorn is not installed on the system: its
# Debian packages are downloaded with `apt-get download`, unpacked with `dpkg-deb -x` and
# run by $PYTHON with PYTHONPATH pointing at them.
#
# wsgirun keeps its memory snapshots in $WSGIRUN_CACHE/bench/snapshots/SETUP during the run
# (WSGIRUN_CACHE_DIR is set to it). The script empties that folder before each cold start.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
CACHE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")"
BENCH_CACHE="$CACHE_DIR/bench"
LOG_DIR="$BENCH_CACHE/logs"
SNAPSHOT_DIR="$BENCH_CACHE/snapshots"
GUNICORN_ROOT="$BENCH_CACHE/root"
GUNICORN_PATH="$GUNICORN_ROOT/usr/lib/python3/dist-packages"
RESULTS_FILE="$SCRIPT_DIR/results/latest.md"

PORT="${BENCH_PORT:-18471}"
DURATION="${BENCH_DURATION:-10}"
WARMUP="${BENCH_WARMUP:-3}"
STARTS="${BENCH_STARTS:-3}"
MAX_LOAD="${BENCH_MAX_LOAD:-1.5}"
LOAD_WAIT_S="${BENCH_LOAD_WAIT:-10}"

# Bounds on every wait, so that a broken server fails the run instead of hanging it.
START_TIMEOUT_S=180
STOP_TIMEOUT_S=15
UPLOAD_TIMEOUT_S=600
POLL_INTERVAL_S=0.02
RSS_SAMPLE_INTERVAL_S=0.2

UPLOAD_BYTES=1073741824

WSGIRUN_THREADS=2
GTHREAD_WORKERS=2
GTHREAD_THREADS=15
SYNC_WORKERS=2

# The process ids this script started and has not stopped yet. The exit trap stops them.
RUNNING_PIDS=()

# shellcheck source=bench/apache.sh
source "$SCRIPT_DIR/apache.sh"

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

check_settings() {
  local name value
  for name in PORT DURATION WARMUP STARTS LOAD_WAIT_S; do
    value="${!name}"
    [[ "$value" =~ ^[0-9]+$ && "$value" -gt 0 ]] || fail "BENCH_$name is '$value'; set it to a positive integer"
  done
  [[ "$PORT" -lt 65535 ]] || fail "BENCH_PORT is $PORT; set it below 65535, because the run also uses the next port"
}

# ---------------------------------------------------------------------------
# Machine load

load_average() {
  cut -d' ' -f1 /proc/loadavg
}

load_is_high() {
  awk -v value="$1" -v max="$MAX_LOAD" 'BEGIN {exit !(value > max)}'
}

# Waits up to LOAD_WAIT_S for the 1-minute load average to drop to MAX_LOAD and sets
# LOAD_NOW to the load at the end of the wait. The previous measurement's own load (wrk and
# the server on 2 cores) takes about 25 s to decay below 1.5, so the wait is bounded
# rather than open-ended when other jobs keep the machine busy.
LOAD_NOW=""
wait_for_low_load() {
  local deadline=$(($(now_ms) + LOAD_WAIT_S * 1000))
  LOAD_NOW="$(load_average)"
  while load_is_high "$LOAD_NOW" && [[ $(now_ms) -lt $deadline ]]; do
    sleep 2
    LOAD_NOW="$(load_average)"
  done
}

# ---------------------------------------------------------------------------
# Tools

find_deno() {
  if [[ -n "${DENO:-}" ]]; then
    [[ -x "$DENO" ]] || command -v "$DENO" >/dev/null 2>&1 || fail "DENO is '$DENO', which is not an executable; set DENO to the deno binary"
    echo "$DENO"
  elif command -v deno >/dev/null 2>&1; then
    command -v deno
  else
    fail "deno not found on PATH; set DENO to the path of the deno binary"
  fi
}

find_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x /usr/bin/python3 ]]; then
    echo /usr/bin/python3
  else
    require_tool python3 "install python3 or set PYTHON"
    command -v python3
  fi
}

# As root, apt downloads as the unprivileged _apt user and warns when that user cannot
# write to the folder. Downloading as root avoids the warning.
apt_download() {
  local options=()
  if [[ "$EUID" -eq 0 ]]; then
    options+=(-o APT::Sandbox::User=root)
  fi
  apt-get "${options[@]}" download "$@"
}

# Runs an apt command, and after a failure runs `apt-get update` once and tries again,
# because missing or outdated package lists make every download and install fail.
apt_with_update() {
  local apt_log="$1"
  shift
  if "$@" >"$apt_log" 2>&1; then
    return
  fi
  [[ "$EUID" -eq 0 ]] || {
    cat "$apt_log" >&2
    fail "'$*' failed, probably because the package lists are out of date; run 'sudo apt-get update' and then this script again"
  }
  log "'$*' failed; running apt-get update once and trying again"
  apt-get update >"$apt_log" 2>&1 || {
    cat "$apt_log" >&2
    fail "apt-get update failed (output above)"
  }
  "$@" >"$apt_log" 2>&1 || {
    cat "$apt_log" >&2
    fail "'$*' failed after apt-get update (output above)"
  }
}

install_wrk() {
  if command -v wrk >/dev/null 2>&1; then
    return
  fi
  [[ "$EUID" -eq 0 ]] || fail "wrk not found; install it with 'sudo apt-get install wrk' and run this script again"
  log "installing wrk with apt-get (a benchmark tool only)"
  apt_with_update "$LOG_DIR/apt-wrk.log" apt-get install -y wrk
}

# Downloads and unpacks gunicorn unless the unpacked tree is already there.
fetch_gunicorn() {
  local python="$1"
  if [[ -f "$GUNICORN_PATH/gunicorn/__init__.py" ]]; then
    return
  fi
  local packages=(gunicorn python3-gunicorn)
  # gunicorn 20.1 imports pkg_resources at start. Debian's python3 usually has it from
  # python3-pkg-resources, so that package is fetched only when the import fails.
  if ! "$python" -c 'import pkg_resources' >/dev/null 2>&1; then
    packages+=(python3-pkg-resources)
  fi
  log "downloading ${packages[*]} into $BENCH_CACHE/debs"
  rm -rf "$BENCH_CACHE/debs" "$GUNICORN_ROOT"
  mkdir -p "$BENCH_CACHE/debs" "$GUNICORN_ROOT"
  (cd "$BENCH_CACHE/debs" && apt_with_update "$LOG_DIR/apt-gunicorn.log" apt_download "${packages[@]}")
  local deb
  for deb in "$BENCH_CACHE"/debs/*.deb; do
    dpkg-deb -x "$deb" "$GUNICORN_ROOT" || fail "dpkg-deb -x $deb failed; delete $BENCH_CACHE and run this script again"
  done
  [[ -f "$GUNICORN_PATH/gunicorn/__init__.py" ]] || fail "the gunicorn packages did not create $GUNICORN_PATH/gunicorn"
}

gunicorn_version() {
  local python="$1"
  PYTHONPATH="$GUNICORN_PATH" "$python" -c 'import gunicorn; print(gunicorn.__version__)'
}

# ---------------------------------------------------------------------------
# Processes

now_ms() {
  date +%s%3N
}

# Succeeds while the process exists and is not a zombie waiting to be reaped.
is_alive() {
  local pid="$1"
  local state
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != "Z" ]]
}

child_pids() {
  cat /proc/"$1"/task/*/children 2>/dev/null || true
}

# Prints the pid of the deno binary itself: the launched process, or, when DENO is a
# wrapper such as the npm package's Node shim, the first deno process below it.
find_deno_pid() {
  local queue=("$1")
  local pid
  # A wrapper is a few levels deep at most, and the bound keeps a bad /proc read from hanging.
  for _ in 1 2 3 4; do
    local next=()
    for pid in "${queue[@]}"; do
      if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "deno" ]]; then
        echo "$pid"
        return
      fi
      # shellcheck disable=SC2207 # pids are plain numbers
      next+=($(child_pids "$pid"))
    done
    [[ ${#next[@]} -gt 0 ]] || break
    queue=("${next[@]}")
  done
  echo "$1"
}

rss_kb() {
  awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}

# RSS of a process and its children. For gunicorn this adds the master and its workers,
# which counts pages they share once per process.
tree_rss_kb() {
  local total pid
  total="$(rss_kb "$1")"
  for pid in $(child_pids "$1"); do
    total=$((total + $(rss_kb "$pid")))
  done
  echo "$total"
}

kb_to_mb() {
  awk -v kb="$1" 'BEGIN {printf "%.0f", kb / 1024}'
}

forget_pid() {
  local kept=() pid
  for pid in "${RUNNING_PIDS[@]}"; do
    [[ "$pid" == "$1" ]] || kept+=("$pid")
  done
  RUNNING_PIDS=("${kept[@]}")
}

# Stops a process this script started: SIGTERM, then SIGKILL after STOP_TIMEOUT_S.
stop_pid() {
  local pid="$1"
  local deadline=$(($(now_ms) + STOP_TIMEOUT_S * 1000))
  kill -TERM "$pid" 2>/dev/null || true
  while is_alive "$pid" && [[ $(now_ms) -lt $deadline ]]; do
    sleep 0.1
  done
  if is_alive "$pid"; then
    log "warning: pid $pid did not stop within ${STOP_TIMEOUT_S} s of SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

stop_all() {
  local pid
  for pid in "${RUNNING_PIDS[@]}"; do
    stop_pid "$pid"
  done
}

# Set by start_wsgirun, start_gunicorn and start_apache: the launched process, the
# process to measure and stop, and the log file of the server's output.
LAUNCH_PID=""
SERVER_PID=""
SERVER_LOG=""
# The snapshot cache folder of the next wsgirun start.
WSGIRUN_SNAPSHOTS="$SNAPSHOT_DIR/shared"

# start_wsgirun NAME SCRIPT PYTHON THREADS [OPTION...]
start_wsgirun() {
  local name="$1" script="$2" python="$3" threads="$4"
  shift 4
  SERVER_LOG="$LOG_DIR/$name.log"
  (cd "$REPO_ROOT" && WSGIRUN_CACHE_DIR="$WSGIRUN_SNAPSHOTS" exec "$DENO_BIN" run --allow-all main.ts "$script" \
    --port "$PORT" --threads "$threads" --python "$python" "$@") >"$SERVER_LOG" 2>&1 &
  LAUNCH_PID=$!
  RUNNING_PIDS+=("$LAUNCH_PID")
  SERVER_PID="$LAUNCH_PID"
}

# start_gunicorn NAME SCRIPT WORKER_CLASS
start_gunicorn() {
  local name="$1" script="$2" worker_class="$3"
  local options=(--bind "127.0.0.1:$GUNICORN_PORT" --worker-class "$worker_class" --log-level warning)
  if [[ "$worker_class" == "gthread" ]]; then
    options+=(--workers "$GTHREAD_WORKERS" --threads "$GTHREAD_THREADS")
  else
    options+=(--workers "$SYNC_WORKERS")
  fi
  SERVER_LOG="$LOG_DIR/$name.log"
  (cd "$REPO_ROOT" && WSGI_SCRIPT="$REPO_ROOT/$script" \
    PYTHONPATH="$SCRIPT_DIR:$GUNICORN_PATH:$FRAMEWORK_PATH" \
    exec "$PYTHON_BIN" -m gunicorn "${options[@]}" wsgi_script_loader:application) >"$SERVER_LOG" 2>&1 &
  LAUNCH_PID=$!
  RUNNING_PIDS+=("$LAUNCH_PID")
  SERVER_PID="$LAUNCH_PID"
}

stop_server() {
  if [[ -n "$APACHE_RUNNING_CONF" ]]; then
    stop_apache
    return
  fi
  if [[ "$SERVER_PID" != "$LAUNCH_PID" ]]; then
    stop_pid "$SERVER_PID"
  fi
  stop_pid "$LAUNCH_PID"
}

http_status() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

port_is_free() {
  local code=0
  curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/" 2>/dev/null || code=$?
  # curl exits with 7 when nothing accepts the connection.
  [[ $code -eq 7 ]]
}

# Polls URL every POLL_INTERVAL_S until it returns status 200 and sets ELAPSED_MS to the
# milliseconds since START_MS. Fails when the server exits or START_TIMEOUT_S passes.
ELAPSED_MS=0
wait_for_200() {
  local url="$1" start_ms="$2"
  local deadline=$((start_ms + START_TIMEOUT_S * 1000))
  while [[ $(now_ms) -lt $deadline ]]; do
    if [[ "$(http_status "$url")" == "200" ]]; then
      ELAPSED_MS=$(($(now_ms) - start_ms))
      return
    fi
    if ! is_alive "$LAUNCH_PID"; then
      tail -n 20 "$SERVER_LOG" >&2
      fail "the server exited before it answered $url (log above, full log in $SERVER_LOG)"
    fi
    sleep "$POLL_INTERVAL_S"
  done
  tail -n 20 "$SERVER_LOG" >&2
  fail "no 200 response from $url within ${START_TIMEOUT_S} s (log above)"
}

# Waits until every wsgirun isolate has logged that it is ready.
wait_for_isolates() {
  local count="$1"
  local deadline=$(($(now_ms) + START_TIMEOUT_S * 1000))
  while [[ $(grep -c 'isolate ready' "$SERVER_LOG" || true) -lt $count ]]; do
    [[ $(now_ms) -lt $deadline ]] || fail "fewer than $count isolates ready after ${START_TIMEOUT_S} s; see $SERVER_LOG"
    sleep 0.1
  done
}

# Prints the slowest isolate start that the log reports, in ms.
slowest_isolate_ms() {
  sed -n 's/.*isolate ready:.* in \([0-9]*\) ms.*/\1/p' "$1" | sort -n | tail -n 1
}

# Prints the Python and Pyodide version from the log's isolate ready line.
wsgirun_python_version() {
  sed -n 's/.*isolate ready: Python \([^ ]*\) (Pyodide \([^)]*\)).*/\1 (Pyodide \2)/p' "$1" | head -n 1
}

median() {
  printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# ---------------------------------------------------------------------------
# Load

# Runs a command in the background and waits for it. Unlike a foreground command, `wait`
# returns at once when a trapped signal arrives, and the EXIT trap then stops the command.
run_interruptible() {
  "$@" &
  local pid=$!
  RUNNING_PIDS+=("$pid")
  local status=0
  wait "$pid" || status=$?
  forget_pid "$pid"
  return "$status"
}

# Prints "requests/s p50_ms p99_ms errors" from wrk --latency output. Errors are socket
# errors plus responses that were not 2xx or 3xx.
parse_wrk() {
  awk '
    function ms(value) {
      if (value ~ /us$/) return value / 1000
      if (value ~ /ms$/) return value + 0
      if (value ~ /s$/) return value * 1000
      return value + 0
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { errors += $NF }
    /Socket errors:/ {
      for (i = 3; i <= NF; i++) {
        gsub(/,/, "", $i)
        if ($i ~ /^[0-9]+$/) errors += $i
      }
    }
    END { printf "%.0f %.2f %.2f %d\n", rps, p50, p99, errors }
  ' "$1"
}

# run_wrk NAME URL CONNECTIONS: sets WRK_RESULT to the parse_wrk fields and WRK_LOAD to
# the load average before the measurement. A measurement that started above MAX_LOAD runs
# once more, and the second one is reported.
WRK_RESULT=()
WRK_LOAD=""
run_wrk() {
  local name="$1" url="$2" connections="$3"
  local threads=2
  # wrk needs at least one connection per thread.
  [[ "$connections" -ge 2 ]] || threads=1
  local output="$LOG_DIR/$name.wrk-c$connections.txt"
  local attempt
  for attempt in 1 2; do
    wait_for_low_load
    WRK_LOAD="$LOAD_NOW"
    run_interruptible timeout $((DURATION + 30)) wrk -t"$threads" -c"$connections" -d"${DURATION}s" \
      --latency "$url" >"$output" 2>&1 || fail "wrk -c$connections $url failed; see $output"
    load_is_high "$WRK_LOAD" || break
    [[ $attempt -eq 1 ]] && log "$name: load $WRK_LOAD before wrk -c$connections was above $MAX_LOAD; measuring again"
  done
  read -r -a WRK_RESULT <<<"$(parse_wrk "$output")"
  [[ ${#WRK_RESULT[@]} -eq 4 && "${WRK_RESULT[0]}" -gt 0 ]] || fail "no requests/s in the wrk output $output"
}

warm_up() {
  run_interruptible timeout $((WARMUP + 30)) wrk -t2 -c64 -d"${WARMUP}s" "$1" >/dev/null 2>&1 ||
    fail "the warm-up load on $1 failed"
}

# ---------------------------------------------------------------------------
# Benchmarks

LOAD_ROWS=()
START_ROWS=()
# Requests/s and p99 ms per setup name, for the ratios and the request path table.
declare -A RPS_64=()
declare -A P99_64=()
declare -A RPS_1=()

# start_server KIND NAME ARG...: starts one server of any kind (see bench_setup).
start_server() {
  local kind="$1" name="$2"
  shift 2
  case "$kind" in
    wsgirun) start_wsgirun "$name" "$1" "$2" "$WSGIRUN_THREADS" "${@:3}" ;;
    gunicorn) start_gunicorn "$name" "$1" "$2" ;;
    apache) start_apache "$name" "$1" ;;
  esac
}

# time_starts KIND NAME URL CACHE ARG...: starts the server STARTS times and sets STARTS_MS
# to the times to first response and STARTS_LOAD to the load average before each start.
# CACHE is cold (wsgirun gets an empty snapshot folder each time), warm (the folder of the
# last cold start) or none. Leaves the last server running.
STARTS_MS=()
STARTS_LOAD=()
time_starts() {
  local kind="$1" name="$2" url="$3" cache="$4"
  shift 4
  STARTS_MS=()
  STARTS_LOAD=()
  local attempt start_ms
  for attempt in $(seq 1 "$STARTS"); do
    if [[ "$cache" == "cold" ]]; then
      WSGIRUN_SNAPSHOTS="$SNAPSHOT_DIR/$name"
      rm -rf "$WSGIRUN_SNAPSHOTS"
      mkdir -p "$WSGIRUN_SNAPSHOTS"
    fi
    wait_for_low_load
    STARTS_LOAD+=("$LOAD_NOW")
    log "$name: start $attempt of $STARTS (snapshot cache: $cache, load $LOAD_NOW)"
    start_ms="$(now_ms)"
    start_server "$kind" "$name" "$@"
    wait_for_200 "$url" "$start_ms"
    STARTS_MS+=("$ELAPSED_MS")
    if [[ "$kind" == "wsgirun" ]]; then
      # A cold start writes its snapshots after the first response; waiting for every
      # isolate lets the next warm start find them.
      wait_for_isolates "$WSGIRUN_THREADS"
      SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
      wait_for_snapshot_files "$WSGIRUN_SNAPSHOTS"
    fi
    if [[ $attempt -lt $STARTS ]]; then
      stop_server
    fi
  done
}

# Waits until the snapshot folder contains no file still being written (up to 30 s).
wait_for_snapshot_files() {
  local folder="$1"
  local deadline=$(($(now_ms) + 30000))
  while [[ $(now_ms) -lt $deadline ]]; do
    if ! find "$folder" -name '*.tmp*' 2>/dev/null | grep -q .; then
      return
    fi
    sleep 0.1
  done
}

# bench_setup NAME APP_LABEL SERVER_LABEL KIND ARG...
#   KIND wsgirun: ARG is SCRIPT PYTHON_VERSION [OPTION...]
#   KIND gunicorn: ARG is SCRIPT WORKER_CLASS
#   KIND apache: ARG is SCRIPT (mod_wsgi embedded mode)
# Times STARTS starts (for wsgirun STARTS with an empty snapshot cache, then STARTS with
# the cache the last of them filled), then loads the last server.
bench_setup() {
  local name="$1" app_label="$2" server_label="$3" kind="$4"
  shift 4
  local port="$PORT"
  if [[ "$kind" != "wsgirun" ]]; then
    port="$GUNICORN_PORT"
  fi
  local url="http://127.0.0.1:$port/"
  port_is_free "$port" || fail "port $port on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"

  local cold="-" cold_each="-" cold_load="-" python_label isolate_ms="-"
  if [[ "$kind" == "wsgirun" ]]; then
    time_starts "$kind" "$name" "$url" cold "$@"
    cold="$(median "${STARTS_MS[@]}")"
    cold_each="${STARTS_MS[*]}"
    cold_load="${STARTS_LOAD[*]}"
    stop_server
  fi
  local cache=warm
  [[ "$kind" == "wsgirun" ]] || cache=none
  time_starts "$kind" "$name" "$url" "$cache" "$@"
  local warm warm_each="${STARTS_MS[*]}" warm_load="${STARTS_LOAD[*]}"
  warm="$(median "${STARTS_MS[@]}")"

  case "$kind" in
    wsgirun)
      python_label="$(wsgirun_python_version "$SERVER_LOG")"
      isolate_ms="$(slowest_isolate_ms "$SERVER_LOG")"
      ;;
    apache) python_label="$PYTHON_VERSION (native, embedded)" ;;
    *) python_label="$PYTHON_VERSION (native)" ;;
  esac

  log "$name: warm-up ${WARMUP} s, then wrk at 64 and at 1 connection for ${DURATION} s each"
  warm_up "$url"
  run_wrk "$name" "$url" 64
  local many=("${WRK_RESULT[@]}") many_load="$WRK_LOAD"
  run_wrk "$name" "$url" 1
  local one=("${WRK_RESULT[@]}") one_load="$WRK_LOAD"
  local rss_mb
  rss_mb="$(kb_to_mb "$(tree_rss_kb "$SERVER_PID")")"
  stop_server

  RPS_64[$name]="${many[0]}"
  P99_64[$name]="${many[2]}"
  RPS_1[$name]="${one[0]}"
  LOAD_ROWS+=("| $app_label | $server_label | $python_label | ${many[0]} | ${many[1]} | ${many[2]} | $many_load | ${one[0]} | ${one[1]} | ${one[2]} | $one_load | $((many[3] + one[3])) | $rss_mb |")
  START_ROWS+=("| $app_label | $server_label | $python_label | $cold | $cold_each | $cold_load | $warm | $warm_each | $warm_load | $isolate_ms |")
  log "$name: ${many[0]} requests/s at 64 connections, p99 ${many[2]} ms"
}

ISOLATE_ROWS=()

# Prints each "isolate ready ... in X ms" figure of a log, one a line.
isolate_ready_ms() {
  sed -n 's/.*isolate ready:.* in \([0-9]*\) ms.*/\1/p' "$1"
}

# Starts wsgirun hello (Python 3.14, warm cache) with 1, 2, 4 and 8 isolates and records
# the restore time of each isolate and the RSS of the deno process once all are ready.
bench_isolates() {
  log "isolates: hello with 1, 2, 4 and 8 isolates, warm snapshot cache"
  port_is_free "$PORT" || fail "port $PORT on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"
  WSGIRUN_SNAPSHOTS="$SNAPSHOT_DIR/hello-wsgirun-3.14"
  local count start_ms rss previous_rss="" previous_count="" growth
  for count in 1 2 4 8; do
    wait_for_low_load
    local load="$LOAD_NOW"
    start_ms="$(now_ms)"
    start_wsgirun "isolates-$count" examples/hello/app.wsgi 3.14 "$count"
    wait_for_200 "http://127.0.0.1:$PORT/" "$start_ms"
    wait_for_isolates "$count"
    SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
    rss="$(rss_kb "$SERVER_PID")"
    stop_server
    # shellcheck disable=SC2207 # the figures are plain numbers
    local restores=($(isolate_ready_ms "$SERVER_LOG"))
    growth="-"
    if [[ -n "$previous_rss" ]]; then
      growth="$(kb_to_mb $(((rss - previous_rss) / (count - previous_count))))"
    fi
    ISOLATE_ROWS+=("| $count | $(median "${restores[@]}") | ${restores[*]} | $(kb_to_mb "$rss") | $growth | $load |")
    previous_rss="$rss"
    previous_count="$count"
  done
}

PATH_ROWS=()

# bench_path_row LABEL NAME URL: loads one server already running and adds a row.
bench_path_row() {
  local label="$1" name="$2" url="$3"
  warm_up "$url"
  run_wrk "$name" "$url" 64
  local many=("${WRK_RESULT[@]}") many_load="$WRK_LOAD"
  run_wrk "$name" "$url" 1
  local one=("${WRK_RESULT[@]}") one_load="$WRK_LOAD"
  PATH_ROWS+=("| $label | ${many[0]} | $(per_request_us "${many[0]}") | ${many[2]} | $many_load | ${one[0]} | $(per_request_us "${one[0]}") | $one_load |")
}

per_request_us() {
  awk -v rps="$1" 'BEGIN {if (rps > 0) printf "%.0f", 1000000 / rps; else print "n/a"}'
}

# Loads the two baselines of bench/request_path.ts and wsgirun hello with 1 isolate. The
# 2-isolate row reuses the hello measurement of bench_setup.
bench_request_path() {
  log "request path: Deno.serve alone, with a worker hop by postMessage or inbox, and wsgirun hello with 1 isolate"
  port_is_free "$PORT" || fail "port $PORT on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"
  local url="http://127.0.0.1:$PORT/" mode start_ms
  for mode in plain worker inbox; do
    SERVER_LOG="$LOG_DIR/path-$mode.log"
    (cd "$REPO_ROOT" && exec "$DENO_BIN" run --allow-net --allow-read bench/request_path.ts "$mode" "$PORT") >"$SERVER_LOG" 2>&1 &
    LAUNCH_PID=$!
    RUNNING_PIDS+=("$LAUNCH_PID")
    SERVER_PID="$LAUNCH_PID"
    wait_for_200 "$url" "$(now_ms)"
    SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
    if [[ "$mode" == "plain" ]]; then
      bench_path_row "Deno.serve alone (request_path.ts plain)" "path-plain" "$url"
    elif [[ "$mode" == "worker" ]]; then
      bench_path_row "+ worker round trip by postMessage, 2 workers (request_path.ts worker)" "path-worker" "$url"
    else
      bench_path_row "+ worker round trip through the inbox, 2 workers (request_path.ts inbox)" "path-inbox" "$url"
    fi
    stop_server
  done

  WSGIRUN_SNAPSHOTS="$SNAPSHOT_DIR/hello-wsgirun-3.14"
  start_ms="$(now_ms)"
  start_wsgirun path-wsgirun-1 examples/hello/app.wsgi 3.14 1
  wait_for_200 "$url" "$start_ms"
  wait_for_isolates 1
  SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
  bench_path_row "+ Python: wsgirun hello, 1 isolate" "path-wsgirun-1" "$url"
  stop_server
  PATH_ROWS+=("| + Python: wsgirun hello, 2 isolates (from the table above) | ${RPS_64[hello-wsgirun-3.14]} | $(per_request_us "${RPS_64[hello-wsgirun-3.14]}") | ${P99_64[hello-wsgirun-3.14]} | - | ${RPS_1[hello-wsgirun-3.14]} | $(per_request_us "${RPS_1[hello-wsgirun-3.14]}") | - |")
}

ADAPTER_LINE=""
bench_adapter_cost() {
  log "adapter: handle() for hello inside Pyodide, without HTTP"
  wait_for_low_load
  local load="$LOAD_NOW"
  local output="$LOG_DIR/adapter-cost.txt"
  (cd "$REPO_ROOT" && run_interruptible timeout 300 "$DENO_BIN" run --allow-read --allow-env bench/adapter_cost.ts) \
    >"$output" 2>&1 || fail "bench/adapter_cost.ts failed; see $output"
  ADAPTER_LINE="$(grep '^adapter:' "$output") (load $load)"
}

UPLOAD_ROWS=()

# Samples the RSS of PID every RSS_SAMPLE_INTERVAL_S into FILE until PID exits or the
# sampler is stopped.
sample_rss() {
  local pid="$1" file="$2"
  while is_alive "$pid"; do
    rss_kb "$pid" >>"$file"
    sleep "$RSS_SAMPLE_INTERVAL_S"
  done
}

# Starts wsgirun with the upload app and waits until every isolate is ready.
start_upload_server() {
  local start_ms
  start_ms="$(now_ms)"
  start_wsgirun upload bench/upload_app.wsgi 3.14 "$WSGIRUN_THREADS"
  wait_for_200 "$1" "$start_ms"
  wait_for_isolates "$WSGIRUN_THREADS"
  SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
}

bench_upload() {
  log "upload: 1 GiB through wsgi.input"
  local url="http://127.0.0.1:$PORT/"
  port_is_free "$PORT" || fail "port $PORT on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"
  # The first start builds the app's snapshot. The measured server restores it, as the
  # servers of the other measurements do.
  WSGIRUN_SNAPSHOTS="$SNAPSHOT_DIR/hello-wsgirun-3.14"
  start_upload_server "$url"
  stop_server
  wait_for_low_load
  local load="$LOAD_NOW"
  start_upload_server "$url"
  sleep 2

  local before samples="$LOG_DIR/upload-rss.txt"
  before="$(rss_kb "$SERVER_PID")"
  : >"$samples"
  sample_rss "$SERVER_PID" "$samples" &
  local sampler=$!
  RUNNING_PIDS+=("$sampler")

  local upload_start upload_ms answer
  upload_start="$(now_ms)"
  # curl streams stdin with chunked transfer coding. Given a Content-Length as well, curl
  # 7.88 sends both headers, and Deno rejects such a request with 400. An empty Expect
  # skips the 100-continue round trip.
  answer="$(head -c "$UPLOAD_BYTES" /dev/zero |
    curl -sS --fail --max-time "$UPLOAD_TIMEOUT_S" -X POST -T - \
      -H 'Transfer-Encoding: chunked' -H 'Content-Type: application/octet-stream' -H 'Expect:' \
      "$url")" || fail "the 1 GiB upload to $url failed; see $SERVER_LOG"
  upload_ms=$(($(now_ms) - upload_start))
  [[ "${answer//[[:space:]]/}" == "$UPLOAD_BYTES" ]] || fail "the upload app counted '$answer' bytes, expected $UPLOAD_BYTES"

  sleep 1
  local after peak
  after="$(rss_kb "$SERVER_PID")"
  stop_pid "$sampler"
  peak="$(sort -n "$samples" | tail -n 1)"
  [[ -n "$peak" && "$peak" -ge "$after" ]] || peak="$after"
  stop_server

  local seconds
  seconds="$(awk -v ms="$upload_ms" 'BEGIN {printf "%.1f", ms / 1000}')"
  UPLOAD_ROWS+=("| RSS before | $(kb_to_mb "$before") MB |")
  UPLOAD_ROWS+=("| RSS peak during the upload (sampled every 200 ms) | $(kb_to_mb "$peak") MB |")
  UPLOAD_ROWS+=("| RSS 1 s after the response | $(kb_to_mb "$after") MB |")
  UPLOAD_ROWS+=("| growth, peak minus before | $(kb_to_mb $((peak - before))) MB |")
  UPLOAD_ROWS+=("| load average before | $load |")
  UPLOAD_ROWS+=("| duration | $seconds s ($(awk -v ms="$upload_ms" -v b="$UPLOAD_BYTES" 'BEGIN {printf "%.0f", b / 1048576 / (ms / 1000)}') MiB/s) |")
}

# ---------------------------------------------------------------------------
# Report

ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'
}

print_report() {
  local cpu memory os
  cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  memory="$(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  # shellcheck source=/dev/null
  os="$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}")"

  echo "# wsgirun benchmark results"
  echo
  echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') by bench/run.sh in $(($(date +%s) - RUN_STARTED_S)) s."
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| CPU | $cpu, $(nproc) cores (nproc) |"
  echo "| memory | $memory |"
  echo "| OS | $os, Linux $(uname -r) |"
  echo "| Deno | $("$DENO_BIN" --version | head -n 1 | awk '{print $2}') |"
  echo "| gunicorn | $GUNICORN_VERSION on Python $PYTHON_VERSION |"
  echo "| Apache, mod_wsgi | $(apache_version), mod_wsgi $(mod_wsgi_version) on Python $PYTHON_VERSION |"
  echo "| wrk | $(wrk --version 2>&1 | head -n 1 | awk '{print $2}') |"
  echo "| load average (1 min) before and after the run | $LOAD_BEFORE, $(load_average) |"
  echo
  echo "Every load column is the 1-minute load average just before that measurement. The script"
  echo "waits up to ${LOAD_WAIT_S} s for it to drop to $MAX_LOAD, and a wrk measurement that"
  echo "still started above $MAX_LOAD runs once more; the table shows the second one."
  echo
  echo "## Requests per second and latency"
  echo
  echo "wrk runs ${DURATION} s per measurement, after ${WARMUP} s of load at 64 connections that is not"
  echo "recorded: -t2 -c64, then -t1 -c1. wsgirun runs $WSGIRUN_THREADS isolates, gunicorn gthread"
  echo "$GTHREAD_WORKERS workers with $GTHREAD_THREADS threads each, gunicorn sync $SYNC_WORKERS workers, Apache"
  echo "mpm_event $APACHE_PROCESSES processes with $APACHE_THREADS threads each and mod_wsgi in embedded mode."
  echo "Errors counts socket errors and non-2xx/3xx responses of both measurements. RSS is read"
  echo "after the load. For gunicorn and Apache it is the sum over the parent and its children."
  echo
  echo "| app | server | Python | req/s, 64 conn. | p50 ms | p99 ms | load | req/s, 1 conn. | p50 ms | p99 ms | load | errors | RSS MB |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${LOAD_ROWS[@]}"
  echo
  echo "## Start to first response"
  echo
  echo "Time from spawning the server to its first 200 response, polled with curl every 20 ms."
  echo "Cold: wsgirun starts with an empty snapshot cache and builds its snapshots. Warm: it"
  echo "starts again with the folder the last cold start filled. Medians over $STARTS starts. The"
  echo "last column is the slowest isolate restore in wsgirun's log during the last warm start."
  echo
  echo "| app | server | Python | cold median ms | cold each ms | load | warm median ms | warm each ms | load | isolate ms |"
  echo "|---|---|---|---:|---|---|---:|---|---|---:|"
  printf '%s\n' "${START_ROWS[@]}"
  echo
  echo "## Isolates (hello, Python 3.14, warm cache)"
  echo
  echo "\"isolate ms\" is the time each isolate's 'isolate ready ... in X ms' log line reports (the"
  echo "snapshot restore). RSS is VmRSS of the deno process once all isolates are ready. Growth"
  echo "is the RSS difference to the previous row divided by the isolates added."
  echo
  echo "| isolates | median isolate ms | each isolate ms | RSS MB | growth per extra isolate MB | load |"
  echo "|---:|---:|---|---:|---:|---:|"
  printf '%s\n' "${ISOLATE_ROWS[@]}"
  echo
  echo "## Request path (hello)"
  echo
  echo "Same wrk settings. µs per request is 1 000 000 / (req/s)."
  echo
  echo "| server | req/s, 64 conn. | µs/request | p99 ms | load | req/s, 1 conn. | µs/request | load |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${PATH_ROWS[@]}"
  echo
  echo "Python adapter inside Pyodide 314.0.8, no HTTP and no worker hop (bench/adapter_cost.ts):"
  echo "$ADAPTER_LINE"
  echo
  echo "## 1 GiB upload through wsgi.input (wsgirun, Python 3.14, $WSGIRUN_THREADS isolates)"
  echo
  echo "| what | value |"
  echo "|---|---:|"
  printf '%s\n' "${UPLOAD_ROWS[@]}"
  echo
  echo "## Ratios at 64 connections"
  echo
  local best_native
  best_native="$(printf '%s\n' "${RPS_64[hello-gunicorn-gthread]}" "${RPS_64[hello-gunicorn-sync]}" "${RPS_64[hello-apache]:-0}" | sort -n | tail -n 1)"
  echo "| ratio | value |"
  echo "|---|---:|"
  echo "| hello, wsgirun Python 3.14 / best native server | $(ratio "${RPS_64[hello-wsgirun-3.14]}" "$best_native") |"
  echo "| Flask, wsgirun Python 3.12 / gunicorn gthread | $(ratio "${RPS_64[flask-wsgirun-3.12]}" "${RPS_64[flask-gunicorn-gthread]}") |"
}

main() {
  RUN_STARTED_S="$(date +%s)"
  check_settings
  GUNICORN_PORT=$((PORT + 1))
  mkdir -p "$LOG_DIR" "$(dirname "$RESULTS_FILE")"
  trap 'stop_apache; stop_all' EXIT
  # Turns Ctrl-C and SIGTERM into a normal exit, so that the EXIT trap stops the servers.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  require_tool curl "install curl"
  require_tool apt-get "this script needs a Debian or Ubuntu system with apt and dpkg"
  require_tool dpkg-deb "this script needs a Debian or Ubuntu system with apt and dpkg"
  DENO_BIN="$(find_deno)"
  PYTHON_BIN="$(find_python)"
  install_wrk
  install_apache
  fetch_gunicorn "$PYTHON_BIN"
  GUNICORN_VERSION="$(gunicorn_version "$PYTHON_BIN")" || fail "gunicorn from $GUNICORN_PATH does not import with $PYTHON_BIN; delete $BENCH_CACHE and run again"
  FRAMEWORK_PATH="$("$REPO_ROOT/examples/fetch_packages.sh")"
  # Installs the npm packages into node_modules now, so that the first timed start does
  # not include it.
  (cd "$REPO_ROOT" && "$DENO_BIN" install) >"$LOG_DIR/deno-install.log" 2>&1 ||
    fail "deno install failed; see $LOG_DIR/deno-install.log"
  rm -rf "$SNAPSHOT_DIR"
  mkdir -p "$SNAPSHOT_DIR"
  # Other programs on the machine skew the numbers, so the report shows the load around the run.
  LOAD_BEFORE="$(load_average)"

  PYTHON_VERSION="$("$PYTHON_BIN" -c 'import platform; print(platform.python_version())')"

  local flask_path_option=(--python-path "$FRAMEWORK_PATH")
  bench_setup hello-wsgirun-3.14 hello "wsgirun" wsgirun examples/hello/app.wsgi 3.14
  bench_setup hello-gunicorn-gthread hello "gunicorn gthread" gunicorn examples/hello/app.wsgi gthread
  bench_setup hello-gunicorn-sync hello "gunicorn sync" gunicorn examples/hello/app.wsgi sync
  bench_setup hello-apache hello "Apache mod_wsgi embedded" apache examples/hello/app.wsgi
  bench_setup flask-wsgirun-3.12 "Flask template page" "wsgirun" wsgirun examples/flask/app.wsgi 3.12 "${flask_path_option[@]}"
  bench_setup flask-gunicorn-gthread "Flask template page" "gunicorn gthread" gunicorn examples/flask/app.wsgi gthread
  bench_setup flask-gunicorn-sync "Flask template page" "gunicorn sync" gunicorn examples/flask/app.wsgi sync
  bench_setup flask-apache "Flask template page" "Apache mod_wsgi embedded" apache examples/flask/app.wsgi
  bench_isolates
  bench_request_path
  bench_adapter_cost
  bench_upload

  print_report | tee "$RESULTS_FILE"
  log "results written to $RESULTS_FILE; server logs and wrk output in $LOG_DIR"
}

main "$@"
