"""Loads transformers' own test suite from the installed version's source distribution (see
tests/test_modeling_upstream.py), in the test process and in the ranks its distributed tests spawn.

The sdist's tests/ folder is imported as the package `transformers_upstream_tests` (its relative imports want a
package, and ours is named `tests` too). Modules the sdist lacks get stand-ins: empty mixins for `generation/` and
`exporters/`, and `distributed_testing_utils.run_distributed` (5.25's tensor- and expert-parallel mixins import it),
which spawns the ranks on CPU with gloo as 5.17's own tensor-parallel harness does.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import socket
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SDIST_TESTS_ENV = "TRANSFORMERS_SDIST_TESTS"
UPSTREAM_PACKAGE = "transformers_upstream_tests"


def _package(name: str, path: list[str]) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = path
    sys.modules[name] = module
    return module


def _stand_in(module_name: str, **attributes) -> None:
    """A module of the upstream package that the sdist lacks, holding `attributes`."""
    parent, _, leaf = f"{UPSTREAM_PACKAGE}.{module_name}".rpartition(".")
    if parent not in sys.modules:
        _package(parent, [])
    module = types.ModuleType(f"{parent}.{leaf}")
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module


def load_upstream_module(tests_dir: Path, module_name: str) -> types.ModuleType:
    """`tests/<module_name>.py` of the sdist, imported as `transformers_upstream_tests.<module_name>`."""
    if UPSTREAM_PACKAGE not in sys.modules:
        _package(UPSTREAM_PACKAGE, [str(tests_dir)])
        _stand_in("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _stand_in("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _stand_in("distributed_testing_utils", run_distributed=run_distributed)
    with warnings.catch_warnings():  # its marks (flash_attn_test, ...) are registered in transformers' conftest only
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{UPSTREAM_PACKAGE}.{module_name}")


def upstream_module_exists(tests_dir: Path, module_name: str) -> bool:
    return (tests_dir / f"{module_name}.py").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_distributed(world_size: int):
    """`run_distributed(world_size=N)(impl)(*args)` runs `impl(rank, *args)` on N CPU processes joined by gloo.

    `impl` is sent to the ranks by module and name: the upstream package exists only where this module loaded it,
    so each rank loads it again (from `TRANSFORMERS_SDIST_TESTS`) before looking `impl` up.
    """

    def decorate(impl):
        def run(*args):
            target = (impl.__module__, impl.__qualname__)
            mp.spawn(_run_rank, args=(world_size, _free_port(), target, args), nprocs=world_size)

        return run

    return decorate


def _run_rank(rank: int, world_size: int, port: int, target: tuple[str, str], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="localhost", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)  # the ranks share the machine's cores
    module_name, qualname = target
    load_upstream_module(Path(os.environ[SDIST_TESTS_ENV]), module_name.removeprefix(f"{UPSTREAM_PACKAGE}."))
    impl = getattr(sys.modules[module_name], qualname)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        impl(rank, *args)
    finally:
        dist.destroy_process_group()
