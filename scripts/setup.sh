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
echo "setup: installing $(grep -c '==' requirements.lock) pinned packages from requirements.lock"
"${PIP[@]}" install --no-deps -r requirements.lock 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
"${PIP[@]}" install --no-deps -e . 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
echo "$want" > "$stamp"
echo "setup: done"
