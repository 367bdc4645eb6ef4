#!/usr/bin/env bash
# Runs the whole test suite: fetches the example frameworks, starts the
# database servers the real-application tests use, runs `deno test`, and
# stops the servers again. Extra arguments go to `deno test`.
set -uo pipefail
cd "$(dirname "$0")/.."

bash examples/fetch_packages.sh > /dev/null || exit 1

# The database servers need root to install; without them those tests skip
# (outside CI) with the reason.
if bash tests/services.sh start; then
  trap 'bash tests/services.sh stop' EXIT
else
  echo "tests/run.sh: database servers not started; tests that need them are skipped" >&2
fi

deno test --allow-all "$@" tests/
