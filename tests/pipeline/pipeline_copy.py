"""Helpers for end-to-end tests: a throwaway copy of the project that DVC can run in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_project_copy(dest: Path, overrides: dict | None = None, tiny: bool = True) -> Path:
    """Copy the git-tracked project (and data/sample) to ``dest``, apply the tiny profile
    (unless ``tiny`` is False: then params.yaml and dvc.lock stay as committed) plus
    ``overrides`` to params.yaml, and make it a fresh git + DVC repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copytree(ROOT / "data" / "sample", dest / "data" / "sample", dirs_exist_ok=True)
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    if tiny or overrides:
        (dest / "dvc.lock").unlink(missing_ok=True)
        params = yaml.safe_load((dest / "params.yaml").read_text())
        profile = yaml.safe_load((ROOT / "tests" / "params_tiny.yaml").read_text()) if tiny else {}
        params = deep_merge(deep_merge(params, profile), overrides or {})
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PATH"] = f"{VENV_BIN}{os.pathsep}{environment.get('PATH', '')}"
    return environment


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result
