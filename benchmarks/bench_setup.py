"""Set-up: installing requirements.lock into a new virtual environment with uv (what
scripts/setup.sh does) against pip (what it did before), in the same run.

    python3 benchmarks/bench_setup.py [--repeats 1]

Each install starts from nothing, as on a fresh clone of a new machine: a new venv and an
empty download cache (a temp folder per run for pip's and for uv's), the same lock, the same
``--no-deps`` install of every pinned package plus the project in editable mode. Both take
torch from pip's find-links folders (this machine's CPU build). Prints the seconds of each
and their ratio, and checks that both environments hold the same packages at the same
versions. Needs the registries (PyPI); takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV_VERSION = next(line.split("=", 1)[1].split()[0] for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
                  if line.startswith("UV_VERSION="))


def run(*command, env=None) -> None:
    subprocess.run([str(part) for part in command], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def find_links() -> list[str]:
    configured = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
        capture_output=True, text=True).stdout
    return [link for link in configured.split() if Path(link).is_dir()]


def freeze(venv: Path) -> set[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line and not line.startswith(("uv==", "#"))}


def install_with_pip(venv: Path, cache: Path) -> None:
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", "--cache-dir", cache]
    run(*pip, "install", "--no-deps", "-r", "requirements.lock")
    run(*pip, "install", "--no-deps", "-e", ".")


def install_with_uv(venv: Path, cache: Path) -> None:
    env = {**os.environ, "UV_CACHE_DIR": str(cache)}
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", "--cache-dir", cache]
    run(*pip, "install", f"uv=={UV_VERSION}")     # part of the cost: a fresh machine pays it too
    links = [arg for link in find_links() for arg in ("--find-links", link)]
    uv = [venv / "bin" / "uv", "pip", "install", "--python", venv / "bin" / "python", "--no-deps", "--quiet", *links]
    run(*uv, "-r", "requirements.lock", env=env)
    run(*uv, "--no-build-isolation", "-e", ".", env=env)


def timed_install(install, work: Path, name: str) -> tuple[float, set[str]]:
    venv, cache = work / f"venv-{name}", work / f"cache-{name}"
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    started = time.perf_counter()
    install(venv, cache)
    seconds = time.perf_counter() - started
    return seconds, freeze(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    pip_times, uv_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench_setup_") as tmp:
        work = Path(tmp)
        for _ in range(args.repeats):
            seconds, pip_packages = timed_install(install_with_pip, work, "pip")
            pip_times.append(seconds)
            seconds, uv_packages = timed_install(install_with_uv, work, "uv")
            uv_times.append(seconds)
            if pip_packages != uv_packages:
                sys.exit(f"bench_setup: the two environments differ: pip only {sorted(pip_packages - uv_packages)}, "
                         f"uv only {sorted(uv_packages - pip_packages)}")
    pip_best, uv_best = min(pip_times), min(uv_times)
    print(f"bench_setup: {len(pip_packages)} packages from requirements.lock + the project, new venv, empty caches "
          f"(load {load:.1f} at the start)")
    print(f"  pip (baseline)        {pip_best:6.1f} s")
    print(f"  uv {UV_VERSION} (setup.sh)  {uv_best:6.1f} s   {pip_best / uv_best:.1f}x faster; same packages and versions")


if __name__ == "__main__":
    main()
