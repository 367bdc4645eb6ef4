#!/usr/bin/env bash
# Runs the whole test suite: fetches the example frameworks, starts the
# database servers the real-application tests use, runs `deno test`, and
# stops the servers again. Extra arguments go to `deno test`.
set -uo pipefail
cd "$(dirname "$0")/.."

# Returns success when every folder from / down to $1 lets other users enter it.
others_can_enter() {
  local folder=$1
  while :; do
    (( 8#$(stat -c %a "$folder") & 1 )) || return 1
    [ "$folder" = / ] && return 0
    folder=$(dirname "$folder")
  done
}

# As root, the daemon tests run groups as the user nobody, and the database
# servers run as nobody too, so nobody must be able to read this checkout.
# A checkout inside a private folder (`mktemp -d` makes one with mode 0700)
# is copied, with its uncommitted changes, to a folder others can enter, and
# the suite runs from there.
if [ "$(id -u)" = 0 ] && [ -z "${WSGIRUN_TESTS_COPIED:-}" ] && ! others_can_enter "$PWD"; then
  copy=$(mktemp -d "${TMPDIR:-/tmp}/wsgirun-tests.XXXXXX") || exit 1
  chmod 755 "$copy"
  others_can_enter "$copy" || { echo "tests/run.sh: other users cannot enter $copy either" >&2; exit 1; }
  echo "tests/run.sh: other users cannot enter $PWD; running the suite from a copy in $copy" >&2
  git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -C "$copy" -xf -
  WSGIRUN_TESTS_COPIED=1 bash "$copy/tests/run.sh" "$@"
  status=$?
  rm -rf "$copy"
  exit "$status"
fi

bash examples/fetch_packages.sh > /dev/null || exit 1

# The tests make temporary folders (snapshot caches of tens of megabytes
# among them), and a failed or stopped test leaves its own behind. They all
# go into one folder that is removed at the end. Daemon groups run as the
# user nobody and keep their cache there too, so other users may enter it.
test_tmp=$(mktemp -d "${TMPDIR:-/tmp}/wsgirun-test-tmp.XXXXXX") || exit 1
chmod 755 "$test_tmp"
services_started=
cleanup() {
  if [ -n "$services_started" ]; then bash tests/services.sh stop; fi
  rm -rf "$test_tmp"
}
trap cleanup EXIT

# The database servers need root to install; without them those tests skip
# (outside CI) with the reason.
if bash tests/services.sh start; then
  services_started=1
else
  echo "tests/run.sh: database servers not started; tests that need them are skipped" >&2
fi

TMPDIR=$test_tmp deno test --allow-all "$@" tests/
