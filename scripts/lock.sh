#!/usr/bin/env bash
# Refreshes requirements.lock: resolves the project's dependencies (pyproject.toml) afresh in a
# throwaway virtual environment and records the exact version of every installed package,
# transitive ones included. scripts/setup.sh installs from that file and nothing else, so a
# fresh machine gets the environment the tests passed with. Run it after changing a
# dependency, then run the tests, then commit the new lock file:
#
#   bash scripts/lock.sh && bash scripts/run_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
PIP=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
# The same top-level requests as before the lock existed (see setup.sh for why each is special).
"${PIP[@]}" install --upgrade pip "setuptools<81" wheel 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install dlib-bin face_recognition_models
"${PIP[@]}" install --no-deps face_recognition==1.3.0
# resemblyzer (GE2E's weights, speech2face.models.ge2e) without its dependencies: they would add
# webrtcvad, built from source, and typing, a backport for Python < 3.5. webrtcvad-wheels is the
# same module prebuilt; the others (librosa, numpy, scipy, torch) come with ".[test]" below.
"${PIP[@]}" install webrtcvad-wheels==2.0.14.post1
"${PIP[@]}" install --no-deps resemblyzer==0.1.4
"${PIP[@]}" install ".[test]"
{
  echo "# Exact versions of every Python package the pipeline and the tests use."
  echo "# Made by scripts/lock.sh with $("$work/venv/bin/python" --version); installed by scripts/setup.sh."
  echo "# face_recognition is installed without its dependency on the source dlib (dlib-bin provides it),"
  echo "# resemblyzer without webrtcvad (webrtcvad-wheels provides it) and typing (in the standard library)."
  "$work/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -i -E '^(speech2face|pip)[=@ ]' \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
rm -rf build  # what setuptools left of the project build
echo "lock: requirements.lock has $(grep -c '==' requirements.lock) packages"
