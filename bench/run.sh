#!/usr/bin/env bash
# Benchmark wsgirun against gunicorn on this machine and print the results as Markdown.
#
# Usage: bench/run.sh   (or: deno task bench)
#   Progress goes to stderr. The results go to stdout and to bench/results/latest.md.
#   With the default settings one run takes about five minutes.
#
# What runs, each server alone on loopback:
#   - examples/hello/app.wsgi under wsgirun (2 isolates, Python 3.14 and 3.12) and under
#     gunicorn (gthread 2 workers x 15 threads, sync 2 workers);
#   - the template page of examples/flask/app.wsgi under wsgirun (2 isolates, Python 3.12)
#     and the same two gunicorn setups;
#   - for each: the time from start to first response, first with an empty snapshot cache
#     and then BENCH_STARTS more times, then wrk at 64 and at 1 connection;
#   - the server's RSS with 1 and 2 idle isolates, and during a 1 GiB upload through
#     wsgi.input to bench/upload_app.wsgi.
#
# Environment:
#   DENO            deno binary that runs wsgirun (default: deno on PATH). Give the real
#                   binary, not the Node shim of the npm package in node_modules/.bin.
#   PYTHON          Python that runs gunicorn (default: /usr/bin/python3, else python3 on PATH)
#   WSGIRUN_CACHE   cache folder, shared with examples/fetch_packages.sh (default: .cache in
#                   the repository root). gunicorn is unpacked into $WSGIRUN_CACHE/bench.
#   BENCH_PORT      first of the two loopback TCP ports used (default: 18471)
#   BENCH_DURATION  seconds of each wrk measurement (default: 10)
#   BENCH_WARMUP    seconds of load before each measurement, not recorded (default: 3)
#   BENCH_STARTS    starts per server setup after the first one; the median is reported
#                   (default: 3)
#
# Tools: wrk is installed with `apt-get install -y wrk` when it is missing. It is needed
# only for benchmarks, never by wsgirun. gunicorn is not installed on the system: its
# Debian packages are downloaded with `apt-get download`, unpacked with `dpkg-deb -x` and
# run by $PYTHON with PYTHONPATH pointing at them.
#
# wsgirun keeps its memory snapshots in $WSGIRUN_CACHE/bench/snapshots during the run
# (WSGIRUN_CACHE_DIR is set to it). The script empties that folder at the start, so the
# first start of each wsgirun setup builds its snapshots and later starts restore them.
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
  for name in PORT DURATION WARMUP STARTS; do
    value="${!name}"
    [[ "$value" =~ ^[0-9]+$ && "$value" -gt 0 ]] || fail "BENCH_$name is '$value'; set it to a positive integer"
  done
  [[ "$PORT" -lt 65535 ]] || fail "BENCH_PORT is $PORT; set it below 65535, because the run also uses the next port"
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

# Set by start_wsgirun and start_gunicorn: the launched process, the process to measure
# and stop, and the log file of the server's output.
LAUNCH_PID=""
SERVER_PID=""
SERVER_LOG=""

# start_wsgirun NAME SCRIPT PYTHON THREADS [OPTION...]
start_wsgirun() {
  local name="$1" script="$2" python="$3" threads="$4"
  shift 4
  SERVER_LOG="$LOG_DIR/$name.log"
  (cd "$REPO_ROOT" && WSGIRUN_CACHE_DIR="$SNAPSHOT_DIR" exec "$DENO_BIN" run --allow-all main.ts "$script" \
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

# run_wrk NAME URL CONNECTIONS: sets WRK_RESULT to the parse_wrk fields.
WRK_RESULT=()
run_wrk() {
  local name="$1" url="$2" connections="$3"
  local threads=2
  # wrk needs at least one connection per thread.
  [[ "$connections" -ge 2 ]] || threads=1
  local output="$LOG_DIR/$name.wrk-c$connections.txt"
  run_interruptible timeout $((DURATION + 30)) wrk -t"$threads" -c"$connections" -d"${DURATION}s" \
    --latency "$url" >"$output" 2>&1 || fail "wrk -c$connections $url failed; see $output"
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
# Requests/s at 64 connections per setup name, for the ratios.
declare -A RPS_64=()

# bench_setup NAME APP_LABEL SERVER_LABEL KIND ARG...
#   KIND wsgirun: ARG is SCRIPT PYTHON_VERSION [OPTION...]
#   KIND gunicorn: ARG is SCRIPT WORKER_CLASS
# Starts the server 1 + BENCH_STARTS times and times each start, then loads the last one.
bench_setup() {
  local name="$1" app_label="$2" server_label="$3" kind="$4"
  shift 4
  local port="$PORT"
  if [[ "$kind" == "gunicorn" ]]; then
    port="$GUNICORN_PORT"
  fi
  local url="http://127.0.0.1:$port/"
  port_is_free "$port" || fail "port $port on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"

  local first_ms="" starts=() attempt start_ms python_label isolate_ms="-"
  for attempt in $(seq 0 "$STARTS"); do
    log "$name: start $((attempt + 1)) of $((STARTS + 1))"
    start_ms="$(now_ms)"
    if [[ "$kind" == "wsgirun" ]]; then
      start_wsgirun "$name" "$1" "$2" "$WSGIRUN_THREADS" "${@:3}"
    else
      start_gunicorn "$name" "$1" "$2"
    fi
    wait_for_200 "$url" "$start_ms"
    if [[ $attempt -eq 0 ]]; then
      first_ms="$ELAPSED_MS"
    else
      starts+=("$ELAPSED_MS")
    fi
    if [[ "$kind" == "wsgirun" ]]; then
      wait_for_isolates "$WSGIRUN_THREADS"
      SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
    fi
    if [[ $attempt -lt $STARTS ]]; then
      stop_server
    fi
  done

  if [[ "$kind" == "wsgirun" ]]; then
    python_label="$(wsgirun_python_version "$SERVER_LOG")"
    isolate_ms="$(slowest_isolate_ms "$SERVER_LOG")"
  else
    python_label="$PYTHON_VERSION (native)"
  fi

  log "$name: warm-up ${WARMUP} s, then wrk at 64 and at 1 connection for ${DURATION} s each"
  warm_up "$url"
  run_wrk "$name" "$url" 64
  local many=("${WRK_RESULT[@]}")
  run_wrk "$name" "$url" 1
  local one=("${WRK_RESULT[@]}")
  local rss_mb load
  rss_mb="$(kb_to_mb "$(tree_rss_kb "$SERVER_PID")")"
  load="$(cut -d' ' -f1 /proc/loadavg)"
  stop_server

  RPS_64[$name]="${many[0]}"
  LOAD_ROWS+=("| $app_label | $server_label | $python_label | ${many[0]} | ${many[1]} | ${many[2]} | ${one[0]} | ${one[1]} | ${one[2]} | $((many[3] + one[3])) | $rss_mb | $load |")
  START_ROWS+=("| $app_label | $server_label | $python_label | $first_ms | $(median "${starts[@]}") | ${starts[*]} | $isolate_ms |")
  log "$name: ${many[0]} requests/s at 64 connections, p99 ${many[2]} ms"
}

# Starts wsgirun with hello and THREADS isolates, waits until every isolate is ready and
# the server has been idle for 2 s, so that the start's garbage is collected, and sets
# IDLE_RSS_KB.
IDLE_RSS_KB=0
measure_idle_rss() {
  local threads="$1"
  local start_ms
  start_ms="$(now_ms)"
  start_wsgirun "idle-$threads" examples/hello/app.wsgi 3.14 "$threads"
  wait_for_200 "http://127.0.0.1:$PORT/" "$start_ms"
  wait_for_isolates "$threads"
  SERVER_PID="$(find_deno_pid "$LAUNCH_PID")"
  sleep 2
  IDLE_RSS_KB="$(rss_kb "$SERVER_PID")"
  stop_server
}

MEMORY_ROWS=()

bench_idle_memory() {
  log "memory: idle RSS with 1 and with 2 isolates"
  port_is_free "$PORT" || fail "port $PORT on 127.0.0.1 is in use; stop what listens there or set BENCH_PORT"
  measure_idle_rss 1
  local rss_one="$IDLE_RSS_KB"
  measure_idle_rss 2
  local rss_two="$IDLE_RSS_KB"
  MEMORY_ROWS+=("| RSS, 1 idle isolate | $(kb_to_mb "$rss_one") MB |")
  MEMORY_ROWS+=("| RSS, 2 idle isolates | $(kb_to_mb "$rss_two") MB |")
  MEMORY_ROWS+=("| extra isolate | $(kb_to_mb $((rss_two - rss_one))) MB |")
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
  start_upload_server "$url"
  stop_server
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
  echo "Run on $(date -u '+%Y-%m-%d %H:%M UTC') by bench/run.sh."
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| CPU | $cpu, $(nproc) cores (nproc) |"
  echo "| memory | $memory |"
  echo "| OS | $os, Linux $(uname -r) |"
  echo "| Deno | $("$DENO_BIN" --version | head -n 1 | awk '{print $2}') |"
  echo "| gunicorn | $GUNICORN_VERSION on Python $PYTHON_VERSION |"
  echo "| wrk | $(wrk --version 2>&1 | head -n 1 | awk '{print $2}') |"
  echo "| load average (1 min) before and after the run | $LOAD_BEFORE, $(cut -d' ' -f1 /proc/loadavg) |"
  echo
  echo "## Requests per second and latency"
  echo
  echo "wrk runs ${DURATION} s per measurement, after ${WARMUP} s of load at 64 connections that is not"
  echo "recorded: -t2 -c64, then -t1 -c1. wsgirun runs $WSGIRUN_THREADS isolates, gunicorn gthread"
  echo "$GTHREAD_WORKERS workers with $GTHREAD_THREADS threads each, gunicorn sync $SYNC_WORKERS workers."
  echo "Errors counts socket errors and non-2xx/3xx responses of both measurements. RSS is read"
  echo "after the load. For gunicorn it is the sum over the master and its workers. Load is the"
  echo "1-minute load average after the load, which includes wrk and the server under test."
  echo
  echo "| app | server | Python | req/s, 64 conn. | p50 ms | p99 ms | req/s, 1 conn. | p50 ms | p99 ms | errors | RSS MB | load |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${LOAD_ROWS[@]}"
  echo
  echo "## Start to first response"
  echo
  echo "Time from spawning the server to its first 200 response, polled with curl every 20 ms."
  echo "The first start of a wsgirun setup builds its snapshots into an empty cache, and the"
  echo "median is over the $STARTS starts after it. The last column is the slowest isolate start"
  echo "in wsgirun's log during the last start."
  echo
  echo "| app | server | Python | first start ms | median ms | each start ms | isolate start ms |"
  echo "|---|---|---|---:|---:|---|---:|"
  printf '%s\n' "${START_ROWS[@]}"
  echo
  echo "## Memory of idle isolates (hello, Python 3.14)"
  echo
  echo "| what | value |"
  echo "|---|---:|"
  printf '%s\n' "${MEMORY_ROWS[@]}"
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
  best_native="$(printf '%s\n' "${RPS_64[hello-gunicorn-gthread]}" "${RPS_64[hello-gunicorn-sync]}" | sort -n | tail -n 1)"
  echo "| ratio | value |"
  echo "|---|---:|"
  echo "| hello, wsgirun Python 3.14 / best gunicorn | $(ratio "${RPS_64[hello-wsgirun-3.14]}" "$best_native") |"
  echo "| hello, wsgirun Python 3.12 / best gunicorn | $(ratio "${RPS_64[hello-wsgirun-3.12]}" "$best_native") |"
  echo "| Flask, wsgirun Python 3.12 / gunicorn gthread | $(ratio "${RPS_64[flask-wsgirun-3.12]}" "${RPS_64[flask-gunicorn-gthread]}") |"
}

main() {
  check_settings
  GUNICORN_PORT=$((PORT + 1))
  mkdir -p "$LOG_DIR" "$(dirname "$RESULTS_FILE")"
  trap stop_all EXIT
  # Turns Ctrl-C and SIGTERM into a normal exit, so that the EXIT trap stops the servers.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  require_tool curl "install curl"
  require_tool apt-get "this script needs a Debian or Ubuntu system with apt and dpkg"
  require_tool dpkg-deb "this script needs a Debian or Ubuntu system with apt and dpkg"
  DENO_BIN="$(find_deno)"
  PYTHON_BIN="$(find_python)"
  install_wrk
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
  LOAD_BEFORE="$(cut -d' ' -f1 /proc/loadavg)"

  PYTHON_VERSION="$("$PYTHON_BIN" -c 'import platform; print(platform.python_version())')"

  local flask_path_option=(--python-path "$FRAMEWORK_PATH")
  bench_setup hello-wsgirun-3.14 hello "wsgirun" wsgirun examples/hello/app.wsgi 3.14
  bench_setup hello-wsgirun-3.12 hello "wsgirun" wsgirun examples/hello/app.wsgi 3.12
  bench_setup hello-gunicorn-gthread hello "gunicorn gthread" gunicorn examples/hello/app.wsgi gthread
  bench_setup hello-gunicorn-sync hello "gunicorn sync" gunicorn examples/hello/app.wsgi sync
  bench_setup flask-wsgirun-3.12 "Flask template page" "wsgirun" wsgirun examples/flask/app.wsgi 3.12 "${flask_path_option[@]}"
  bench_setup flask-gunicorn-gthread "Flask template page" "gunicorn gthread" gunicorn examples/flask/app.wsgi gthread
  bench_setup flask-gunicorn-sync "Flask template page" "gunicorn sync" gunicorn examples/flask/app.wsgi sync
  bench_idle_memory
  bench_upload

  print_report | tee "$RESULTS_FILE"
  log "results written to $RESULTS_FILE; server logs and wrk output in $LOG_DIR"
}

main "$@"
