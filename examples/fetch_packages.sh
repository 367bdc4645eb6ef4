#!/usr/bin/env bash
# Download Debian's Flask, Django and Bottle packages with their pure-Python run-time
# dependencies and unpack them without installing anything on the system.
#
# Usage: examples/fetch_packages.sh
#   Prints the folder to pass to `wsgirun --python-path` on stdout, progress on stderr.
#
# Environment:
#   WSGIRUN_CACHE  cache folder (default: .cache in the repository root). The .deb files go
#                  to $WSGIRUN_CACHE/debian/debs and are unpacked into
#                  $WSGIRUN_CACHE/debian/root.
#
# A second run with the same package list only checks the stamp file and exits. The script
# runs `apt-get update` only when `apt-get download` cannot find a package, and never
# runs `apt-get install`.
set -euo pipefail

# Packages left out on purpose, although Debian lists them as dependencies:
# - python3-colorama: click imports it only on Windows.
# - python3-importlib-metadata: click and flask need it only before Python 3.10.
# - python3-typing-extensions: asgiref needs it only before Python 3.8.
# - tzdata: pytz reads /usr/share/zoneinfo only for zones other than UTC, and the Django
#   example sets TIME_ZONE = "UTC".
PACKAGES=(
  python3-flask
  python3-werkzeug
  python3-jinja2
  python3-markupsafe
  python3-itsdangerous
  python3-click
  python3-blinker
  python3-django
  python3-asgiref
  python3-sqlparse
  python3-tz
  python3-bottle
  # Django's admin links its jQuery files into this package's folder; werkzeug's
  # interactive debugger uses it too.
  libjs-jquery
)

# Compiled modules that may be unpacked because their package falls back to pure Python
# when the import fails, as it does under Pyodide, which cannot load x86 shared objects.
ALLOWED_EXTENSIONS=(
  markupsafe/_speedups
)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"
# An absolute path, so that the printed folder works from any working directory.
CACHE_DIR="$(realpath -m -- "${WSGIRUN_CACHE:-$REPO_ROOT/.cache}")"
DEBS_DIR="$CACHE_DIR/debian/debs"
ROOT_DIR="$CACHE_DIR/debian/root"
STAMP_FILE="$CACHE_DIR/debian/stamp"
DIST_PACKAGES="$ROOT_DIR/usr/lib/python3/dist-packages"

log() {
  echo "fetch_packages: $*" >&2
}

fail() {
  log "error: $*"
  exit 1
}

# Succeeds when the stamp names exactly the packages above and the unpacked tree exists.
is_up_to_date() {
  [[ -f "$STAMP_FILE" && -d "$DIST_PACKAGES" ]] || return 1
  local stamped wanted
  stamped="$(cut -d' ' -f1 "$STAMP_FILE" | sort)"
  wanted="$(printf '%s\n' "${PACKAGES[@]}" | sort)"
  [[ "$stamped" == "$wanted" ]]
}

# Prints the newest cached .deb of a package, or nothing when none is cached.
find_cached_deb() {
  local package="$1"
  local debs=("$DEBS_DIR/${package}"_*.deb)
  [[ -e "${debs[0]}" ]] || return 0
  printf '%s\n' "${debs[@]}" | sort -V | tail -n 1
}

require_tool() {
  command -v "$1" >/dev/null 2>&1 || fail "'$1' not found; this script needs a Debian or Ubuntu system with apt and dpkg"
}

# Downloads into the current folder. As root, apt downloads as the unprivileged _apt user
# and prints a warning when that user cannot write to the folder. Downloading as root
# avoids the warning.
apt_download() {
  local options=()
  if [[ "$EUID" -eq 0 ]]; then
    options+=(-o APT::Sandbox::User=root)
  fi
  apt-get "${options[@]}" download "$@"
}

download_missing() {
  local missing=()
  local package
  for package in "${PACKAGES[@]}"; do
    if [[ -z "$(find_cached_deb "$package")" ]]; then
      missing+=("$package")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "all ${#PACKAGES[@]} packages are already in $DEBS_DIR"
    return
  fi

  log "downloading ${#missing[@]} packages into $DEBS_DIR: ${missing[*]}"
  mkdir -p "$DEBS_DIR"
  local apt_log="$DEBS_DIR/apt-get.log"
  if (cd "$DEBS_DIR" && apt_download "${missing[@]}") >"$apt_log" 2>&1; then
    return
  fi

  # apt-get download fails for every package when the package lists are missing or
  # older than the archive, so refresh them once and try again.
  if [[ "$EUID" -ne 0 ]]; then
    cat "$apt_log" >&2
    fail "apt-get download failed, probably because the package lists are missing or out of date; run 'sudo apt-get update' and then this script again"
  fi
  log "apt-get download failed; running apt-get update once and trying again"
  apt-get update >"$apt_log" 2>&1 || {
    cat "$apt_log" >&2
    fail "apt-get update failed (output above)"
  }
  if ! (cd "$DEBS_DIR" && apt_download "${missing[@]}") >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    fail "apt-get download ${missing[*]} failed after apt-get update (output above)"
  fi
}

# Unpacks every package into a fresh tree and writes the stamp with the versions unpacked.
unpack_all() {
  log "unpacking into $ROOT_DIR"
  rm -rf "$ROOT_DIR" "$STAMP_FILE"
  mkdir -p "$ROOT_DIR"
  local stamp_lines=()
  local package deb version
  for package in "${PACKAGES[@]}"; do
    deb="$(find_cached_deb "$package")"
    [[ -n "$deb" ]] || fail "no .deb for $package in $DEBS_DIR after the download"
    dpkg-deb -x "$deb" "$ROOT_DIR" || fail "dpkg-deb -x $deb failed; delete that file and run this script again"
    version="$(dpkg-deb -f "$deb" Version)"
    stamp_lines+=("$package $version")
  done
  [[ -d "$DIST_PACKAGES" ]] || fail "the packages did not create $DIST_PACKAGES"
  printf '%s\n' "${stamp_lines[@]}" >"$STAMP_FILE"
  log "unpacked: ${stamp_lines[*]}"
}

# Warns about compiled modules that have no known pure-Python fallback, because Pyodide
# cannot load them and an import would fail at run time.
check_extensions() {
  log "checking for compiled modules"
  local found=0
  local path relative module allowed ok
  while IFS= read -r -d '' path; do
    relative="${path#"$DIST_PACKAGES"/}"
    module="${relative%%.*}"
    ok=0
    for allowed in "${ALLOWED_EXTENSIONS[@]}"; do
      [[ "$module" == "$allowed" ]] && ok=1
    done
    if [[ $ok -eq 0 ]]; then
      log "warning: $relative is a compiled module that Pyodide cannot load"
      found=1
    fi
  done < <(find "$DIST_PACKAGES" -name '*.so' -print0)
  if [[ $found -eq 0 ]]; then
    log "no compiled module without a pure-Python fallback"
  fi
}

main() {
  if is_up_to_date; then
    log "up to date ($STAMP_FILE)"
    echo "$DIST_PACKAGES"
    return
  fi
  require_tool apt-get
  require_tool dpkg-deb
  download_missing
  unpack_all
  check_extensions
  echo "$DIST_PACKAGES"
}

main "$@"
