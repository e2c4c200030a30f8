"""The study scripts (`study/*.py`, not a package) as the tests use them: imported by file path, and run as a user
runs them, in a subprocess from the repository root."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """`study/<name>.py` as a module, registered under `name` (its dataclasses resolve annotations through
    sys.modules); the same module object on every call."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "study" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python study/<name>.py ARGS` from the repository root; asserts it exits 0, showing its output if not."""
    done = subprocess.run(
        [sys.executable, str(REPO / "study" / f"{name}.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done
