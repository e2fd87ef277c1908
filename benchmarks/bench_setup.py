"""Set-up: installing requirements.lock into a new virtual environment with uv (what
scripts/setup.sh does) against pip (what it did before), in the same run.

    python3 benchmarks/bench_setup.py [--repeats 1]

Each install starts from nothing, as on a fresh clone of a new machine: a new venv and an
empty download cache (a temp folder per run for pip's and for uv's), the same lock, the same
``--no-deps`` install of every pinned package plus the project in editable mode. Both take
torch from pip's find-links folders (this machine's CPU build). Prints the seconds of each
and their ratio, and checks that both environments hold the same packages at the same
versions.

Then the cost each later process pays: ``import torch, mlflow`` in a new process of each
environment with ``PYTHONDONTWRITEBYTECODE=1`` (set on this machine: Python then never
caches the bytecode it compiles). pip writes the .pyc files at install; uv only when asked
(``--compile-bytecode``, as setup.sh does), and a third install without it shows why. Needs
the registries (PyPI); takes about 4 minutes on 2 cores.
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


def install_with_uv(venv: Path, cache: Path, compile_bytecode: bool = True) -> None:
    env = {**os.environ, "UV_CACHE_DIR": str(cache)}
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", "--cache-dir", cache]
    run(*pip, "install", f"uv=={UV_VERSION}")     # part of the cost: a fresh machine pays it too
    links = [arg for link in find_links() for arg in ("--find-links", link)]
    uv = [venv / "bin" / "uv", "pip", "install", "--python", venv / "bin" / "python", "--no-deps", "--quiet", *links,
          *(["--compile-bytecode"] if compile_bytecode else [])]
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
    return seconds, freeze(venv), import_seconds(venv)


def import_seconds(venv: Path) -> float:
    """A new process's ``import torch, mlflow``, as every stage starts (best of 2)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    times = []
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, mlflow"], check=True, env=env,
                       capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    installers = {"pip (baseline)": install_with_pip, f"uv {UV_VERSION} (setup.sh)": install_with_uv,
                  f"uv {UV_VERSION}, no .pyc": lambda venv, cache: install_with_uv(venv, cache, False)}
    installs: dict[str, list[float]] = {name: [] for name in installers}
    imports: dict[str, list[float]] = {name: [] for name in installers}
    with tempfile.TemporaryDirectory(prefix="bench_setup_") as tmp:
        work = Path(tmp)
        for _ in range(args.repeats):
            packages = {}
            for index, (name, install) in enumerate(installers.items()):
                seconds, packages[name], imported = timed_install(install, work, str(index))
                installs[name].append(seconds)
                imports[name].append(imported)
            baseline = packages["pip (baseline)"]
            for name, found in packages.items():
                if found != baseline:
                    sys.exit(f"bench_setup: {name} differs from pip: pip only {sorted(baseline - found)}, "
                             f"{name} only {sorted(found - baseline)}")
    print(f"bench_setup: {len(baseline)} packages from requirements.lock + the project, new venv, empty caches "
          f"(load {load:.1f} at the start); the same packages and versions from each")
    pip_install, pip_import = min(installs["pip (baseline)"]), min(imports["pip (baseline)"])
    print(f"  {'installer':24} {'install':>8} {'ratio':>6}   import torch, mlflow in a new process")
    for name in installers:
        install, imported = min(installs[name]), min(imports[name])
        print(f"  {name:24} {install:7.1f}s {pip_install / install:5.1f}x   {imported:5.1f} s "
              f"({imported / pip_import:.1f}x pip's)")


if __name__ == "__main__":
    main()
