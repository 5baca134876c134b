#!/usr/bin/env bash
# Part of `make setup`, best effort: Debian's (or Ubuntu's) libtcmalloc-minimal4, which the `bucketserve`
# commands preload (README: Memory allocator). Without it everything runs on glibc's malloc, slower; setup goes on.
# $1: the environment's python, whose bucketserve finds the library the same way the commands will
set -uo pipefail
PKG=libtcmalloc-minimal4
if "$1" -c "from bucketserve.launcher.allocator import find_tcmalloc as f; raise SystemExit(f() is None)"; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[setup] tcmalloc not found: install $PKG (e.g. sudo apt-get install $PKG) for faster forwards" >&2
  exit 0
fi
echo "[setup] installing $PKG from the distribution's packages" >&2
export DEBIAN_FRONTEND=noninteractive
if ! timeout 300 apt-get install -y -q --no-install-recommends "$PKG" >/dev/null 2>&1; then
  timeout 300 apt-get update -q >/dev/null 2>&1
  timeout 300 apt-get install -y -q --no-install-recommends "$PKG" >/dev/null 2>&1 \
    || echo "[setup] could not install $PKG: running on glibc's malloc" >&2
fi
