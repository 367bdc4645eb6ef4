#!/usr/bin/env bash
# Start or stop private PostgreSQL, MariaDB and Redis servers on loopback for the tests.
#
# Usage: tests/services.sh start|stop|status
#
# `start` installs Debian's postgresql, mariadb-server and redis-server with
# `apt-get install -y` when their programs are missing (this needs root), creates fresh
# data folders under $WSGIRUN_CACHE/services (default: .cache/services) and starts each
# server there. It never touches the system's default instances or ports.
#
#   service      address           database / user / password
#   PostgreSQL   127.0.0.1:55432   wsgirun / wsgirun / wsgirun (md5 login, TLS available)
#   MariaDB      127.0.0.1:53306   wsgirun / wsgirun / wsgirun (TLS available)
#   Redis        127.0.0.1:56379   no password
#
# The TLS certificate of both databases is signed by a CA made for the run:
# $WSGIRUN_CACHE/services/tls/ca.pem. Its names are localhost and 127.0.0.1.
set -euo pipefail

PG_PORT=55432
MARIADB_PORT=53306
REDIS_PORT=56379

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")/services"
TLS_DIR="$BASE_DIR/tls"
PG_DIR="$BASE_DIR/postgresql"
MARIADB_DIR="$BASE_DIR/mariadb"
REDIS_DIR="$BASE_DIR/redis"
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"

log() {
  echo "services: $*" >&2
}

fail() {
  log "error: $*"
  exit 1
}

# Runs a command as a system user; the servers refuse to run as root.
as_user() {
  local user="$1"
  shift
  if [[ "$EUID" -eq 0 ]]; then
    runuser -u "$user" -- "$@"
  else
    "$@"
  fi
}

install_missing() {
  local packages=()
  [[ -n "$PG_BIN" && -x "$PG_BIN/pg_ctl" ]] || packages+=(postgresql)
  command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || packages+=(mariadb-server)
  command -v redis-server >/dev/null || packages+=(redis-server)
  [[ ${#packages[@]} -gt 0 ]] || return 0
  [[ "$EUID" -eq 0 ]] || fail "missing ${packages[*]}; install them with 'sudo apt-get install -y ${packages[*]}'"

  log "installing ${packages[*]} with apt-get"
  # NOTE: where no policy-rc.d forbids it, apt also starts the system's default instances.
  # The tests never use them.
  local install_log="$BASE_DIR/apt-get.log"
  if ! apt-get install -y "${packages[@]}" >"$install_log" 2>&1; then
    apt-get update >>"$install_log" 2>&1 || fail "apt-get update failed (see $install_log)"
    apt-get install -y "${packages[@]}" >>"$install_log" 2>&1 || fail "apt-get install failed (see $install_log)"
  fi
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
}

make_certificates() {
  [[ -f "$TLS_DIR/server.pem" ]] && return 0
  mkdir -p "$TLS_DIR"
  # rustls, which Deno's TLS uses, rejects a self-signed leaf certificate, so a CA signs it.
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=wsgirun test CA" \
    -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$TLS_DIR/ext.cnf"
  openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days 3650 -extfile "$TLS_DIR/ext.cnf" -out "$TLS_DIR/server.pem" 2>/dev/null
  chmod 0644 "$TLS_DIR"/*.pem
}

# Copies the server key for one user, because PostgreSQL requires the key to be its own.
install_key() {
  local user="$1" target="$2"
  cp "$TLS_DIR/server.key" "$target"
  [[ "$EUID" -eq 0 ]] && chown "$user" "$target"
  chmod 0600 "$target"
}

start_postgresql() {
  if as_user postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    log "PostgreSQL is already running on port $PG_PORT"
    return 0
  fi
  rm -rf "$PG_DIR"
  mkdir -p "$PG_DIR"
  [[ "$EUID" -eq 0 ]] && chown postgres "$PG_DIR"
  as_user postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth-local=trust \
    --auth-host=md5 -E UTF8 >"$PG_DIR/initdb.log" 2>&1 || fail "initdb failed (see $PG_DIR/initdb.log)"
  install_key postgres "$PG_DIR/server.key"
  # Debian's pg8000 1.10.6 can log in with md5 passwords only.
  cat >>"$PG_DIR/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
password_encryption = md5
ssl = on
ssl_cert_file = '$TLS_DIR/server.pem'
ssl_key_file = '$PG_DIR/server.key'
fsync = off
EOF
  as_user postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start \
    >/dev/null || fail "PostgreSQL did not start (see $PG_DIR/server.log)"
  as_user postgres "$PG_BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -q -v ON_ERROR_STOP=1 \
    -c "CREATE USER wsgirun PASSWORD 'wsgirun'" -c "CREATE DATABASE wsgirun OWNER wsgirun" \
    >/dev/null || fail "creating the PostgreSQL user failed"
  log "PostgreSQL listens on 127.0.0.1:$PG_PORT"
}

start_mariadb() {
  if [[ -f "$MARIADB_DIR/mariadb.pid" ]] && kill -0 "$(cat "$MARIADB_DIR/mariadb.pid")" 2>/dev/null; then
    log "MariaDB is already running on port $MARIADB_PORT"
    return 0
  fi
  rm -rf "$MARIADB_DIR"
  mkdir -p "$MARIADB_DIR"
  [[ "$EUID" -eq 0 ]] && chown mysql "$MARIADB_DIR"
  install_key mysql "$MARIADB_DIR/server.key"

  mariadb-install-db --no-defaults --datadir="$MARIADB_DIR/data" --user=mysql \
    --auth-root-authentication-method=normal --skip-test-db >"$MARIADB_DIR/install.log" 2>&1 ||
    fail "mariadb-install-db failed (see $MARIADB_DIR/install.log)"
  local server
  server="$(command -v mariadbd || echo /usr/sbin/mariadbd)"
  "$server" --no-defaults --datadir="$MARIADB_DIR/data" --user=mysql \
    --bind-address=127.0.0.1 --port="$MARIADB_PORT" --socket="$MARIADB_DIR/mariadb.sock" \
    --pid-file="$MARIADB_DIR/mariadb.pid" --log-error="$MARIADB_DIR/server.log" \
    --ssl-ca="$TLS_DIR/ca.pem" --ssl-cert="$TLS_DIR/server.pem" --ssl-key="$MARIADB_DIR/server.key" \
    --skip-log-bin --innodb-flush-log-at-trx-commit=0 </dev/null >/dev/null 2>&1 &

  local attempt
  for attempt in $(seq 1 120); do
    mariadb --no-defaults -S "$MARIADB_DIR/mariadb.sock" -u root -e "SELECT 1" >/dev/null 2>&1 && break
    [[ $attempt -eq 120 ]] && fail "MariaDB did not start within 60 s (see $MARIADB_DIR/server.log)"
    sleep 0.5
  done

  mariadb --no-defaults -S "$MARIADB_DIR/mariadb.sock" -u root -e "
    CREATE DATABASE wsgirun;
    CREATE USER 'wsgirun'@'127.0.0.1' IDENTIFIED BY 'wsgirun';
    CREATE USER 'wsgirun'@'localhost' IDENTIFIED BY 'wsgirun';
    GRANT ALL ON wsgirun.* TO 'wsgirun'@'127.0.0.1';
    GRANT ALL ON wsgirun.* TO 'wsgirun'@'localhost';" || fail "creating the MariaDB user failed"
  log "MariaDB listens on 127.0.0.1:$MARIADB_PORT"
}

start_redis() {
  if [[ -f "$REDIS_DIR/redis.pid" ]] && kill -0 "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null; then
    log "Redis is already running on port $REDIS_PORT"
    return 0
  fi
  rm -rf "$REDIS_DIR"
  mkdir -p "$REDIS_DIR"
  [[ "$EUID" -eq 0 ]] && chown redis "$REDIS_DIR"
  as_user redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DIR" \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/server.log" \
    --save "" --appendonly no || fail "redis-server did not start (see $REDIS_DIR/server.log)"
  local attempt
  for attempt in $(seq 1 60); do
    [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]] && break
    [[ $attempt -eq 60 ]] && fail "Redis did not answer within 30 s (see $REDIS_DIR/server.log)"
    sleep 0.5
  done
  log "Redis listens on 127.0.0.1:$REDIS_PORT"
}

# Sends SIGTERM to the process in a pid file and waits up to 30 s for it to exit.
stop_pid_file() {
  local file="$1" name="$2" pid attempt
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if kill "$pid" 2>/dev/null; then
    for attempt in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    log "stopped $name (pid $pid)"
  fi
  rm -f "$file"
}

start() {
  mkdir -p "$BASE_DIR"
  install_missing
  make_certificates
  start_postgresql
  start_mariadb
  start_redis
}

stop() {
  if [[ -n "$PG_BIN" && -d "$PG_DIR/data" ]]; then
    as_user postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 &&
      log "stopped PostgreSQL"
  fi
  stop_pid_file "$MARIADB_DIR/mariadb.pid" MariaDB
  stop_pid_file "$REDIS_DIR/redis.pid" Redis
}

status() {
  local name port
  for name in "PostgreSQL $PG_PORT" "MariaDB $MARIADB_PORT" "Redis $REDIS_PORT"; do
    port="${name#* }"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "${name% *} listens on 127.0.0.1:$port"
    else
      echo "${name% *} is not running (port $port)"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) fail "usage: tests/services.sh start|stop|status" ;;
esac
