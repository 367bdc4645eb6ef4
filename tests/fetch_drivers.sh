#!/usr/bin/env bash
# Download Debian's pure-Python database drivers (pg8000, PyMySQL, redis-py) with their
# run-time dependencies, and pytz, and unpack them without installing anything on the system.
#
# Usage: tests/fetch_drivers.sh
#   Prints the folder to pass to `wsgirun --python-path` on stdout, progress on stderr.
#
# Environment:
#   WSGIRUN_CACHE  cache folder (default: .cache in the repository root). The .deb files go
#                  to $WSGIRUN_CACHE/debian-drivers/debs and are unpacked into
#                  $WSGIRUN_CACHE/debian-drivers/root.
#
# A second run with the same package list only checks the stamp file. The script runs
# `apt-get update` (as root) only when `apt-get download` fails, and never installs.
set -euo pipefail

# Left out although Debian lists them: python3-importlib-metadata and
# python3-typing-extensions, which redis-py needs only before Python 3.8, and
# python3-cryptography, which PyMySQL needs only for sha256 logins without TLS.
PACKAGES=(
  python3-pg8000
  python3-six
  python3-pymysql
  python3-redis
  python3-async-timeout
  python3-deprecated
  python3-wrapt
  python3-packaging
  python3-tz
)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")/debian-drivers"
DEBS_DIR="$CACHE_DIR/debs"
ROOT_DIR="$CACHE_DIR/root"
STAMP_FILE="$CACHE_DIR/stamp"
DIST_PACKAGES="$ROOT_DIR/usr/lib/python3/dist-packages"

log() {
  echo "fetch_drivers: $*" >&2
}

fail() {
  log "error: $*"
  exit 1
}

stamp_matches() {
  [[ -f "$STAMP_FILE" && -d "$DIST_PACKAGES" ]] || return 1
  [[ "$(cut -d' ' -f1 "$STAMP_FILE" | sort)" == "$(printf '%s\n' "${PACKAGES[@]}" | sort)" ]]
}

# Prints the newest cached .deb of a package, or nothing.
cached_deb() {
  local debs=("$DEBS_DIR/$1"_*.deb)
  [[ -e "${debs[0]}" ]] || return 0
  printf '%s\n' "${debs[@]}" | sort -V | tail -n 1
}

# As root, apt downloads as the _apt user, which cannot write to this folder.
apt_download() {
  local options=()
  [[ "$EUID" -eq 0 ]] && options+=(-o APT::Sandbox::User=root)
  (cd "$DEBS_DIR" && apt-get "${options[@]}" download "$@")
}

download_missing() {
  local missing=() package
  for package in "${PACKAGES[@]}"; do
    [[ -n "$(cached_deb "$package")" ]] || missing+=("$package")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0

  mkdir -p "$DEBS_DIR"
  local apt_log="$DEBS_DIR/apt-get.log"
  log "downloading ${missing[*]}"
  apt_download "${missing[@]}" >"$apt_log" 2>&1 && return 0

  # apt-get download fails when the package lists are missing or older than the archive.
  [[ "$EUID" -eq 0 ]] || fail "apt-get download failed (see $apt_log); run 'sudo apt-get update' and try again"
  log "apt-get download failed; running apt-get update once and trying again"
  apt-get update >"$apt_log" 2>&1 || fail "apt-get update failed (see $apt_log)"
  apt_download "${missing[@]}" >"$apt_log" 2>&1 || fail "apt-get download ${missing[*]} failed (see $apt_log)"
}

unpack_all() {
  rm -rf "$ROOT_DIR" "$STAMP_FILE"
  mkdir -p "$ROOT_DIR"
  local lines=() package deb
  for package in "${PACKAGES[@]}"; do
    deb="$(cached_deb "$package")"
    [[ -n "$deb" ]] || fail "no .deb for $package in $DEBS_DIR"
    dpkg-deb -x "$deb" "$ROOT_DIR" || fail "dpkg-deb -x $deb failed; delete that file and run again"
    lines+=("$package $(dpkg-deb -f "$deb" Version)")
  done
  [[ -d "$DIST_PACKAGES" ]] || fail "the packages did not create $DIST_PACKAGES"
  # wrapt's compiled module is built for x86 Linux; without it wrapt uses pure Python.
  find "$DIST_PACKAGES" -name '*.so' -delete
  printf '%s\n' "${lines[@]}" >"$STAMP_FILE"
  log "unpacked into $ROOT_DIR: ${lines[*]}"
}

main() {
  if ! stamp_matches; then
    command -v apt-get >/dev/null || fail "apt-get not found; this script needs Debian or Ubuntu"
    download_missing
    unpack_all
  fi
  echo "$DIST_PACKAGES"
}

main "$@"
