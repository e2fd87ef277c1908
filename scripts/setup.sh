#!/usr/bin/env bash
# Installs everything the pipeline and the tests need. Safe to run again: each step checks
# first and does nothing when its work is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || need_apt+=(ffmpeg)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v sox >/dev/null || need_apt+=(sox)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
UV_VERSION=0.13.9   # the installer, not part of the environment the tests run in

stamp=.venv/.speech2face-setup
want="$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv up to date"
  exit 0
fi

# Every package at the exact version in requirements.lock (made by scripts/lock.sh), without
# resolving anything: a fresh machine gets the environment the tests passed with. Notes on
# three of them: setuptools<81 (face_recognition_models imports pkg_resources); torch 2.13.0
# is a CPU build on this machine's disk (anything unpinned pulls CUDA, GBs); dlib-bin is a
# prebuilt dlib, so face_recognition's dependency on the source dlib (8 min to build) is
# never installed. This machine's pip configuration names package folders that do not
# exist; pip's warning about each is dropped, any other message is shown.
#
# uv installs the same pinned files as pip, several at once (benchmarks/bench_setup.py). uv
# does not read pip's configuration, so pip's find-links folders (where this machine keeps its
# CPU build of torch) are passed on. --compile-bytecode writes the .pyc files at install, as
# pip does: where PYTHONDONTWRITEBYTECODE is set (this machine) Python never caches them, and
# without them every stage process compiles torch and mlflow afresh (about 10 s each).
# Where uv cannot be installed or fails, pip does the same work.
echo "setup: installing $(grep -c '==' requirements.lock) pinned packages from requirements.lock"
quiet_pip() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
install_with_uv() {
  quiet_pip install "uv==$UV_VERSION" || return 1
  local uv_args=(--python .venv/bin/python --no-deps --quiet --compile-bytecode)
  local links
  links="${PIP_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}"
  for link in $links; do [ -d "$link" ] && uv_args+=(--find-links "$link"); done
  .venv/bin/uv pip install "${uv_args[@]}" -r requirements.lock &&
    .venv/bin/uv pip install "${uv_args[@]}" --no-build-isolation -e .
}
if ! install_with_uv; then
  echo "setup: uv did not install the lock; installing with pip"
  quiet_pip install --no-deps -r requirements.lock
  quiet_pip install --no-deps -e .
fi
echo "$want" > "$stamp"
echo "setup: done"
