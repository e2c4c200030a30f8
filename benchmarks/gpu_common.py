"""Shared pieces of the GPU benchmarks (gpu_train.py, gpu_decode.py, gpu_sparse.py).

What machine this is, what it can do at best (measured bf16 matmul and copy ceilings), how a step is timed, how much
memory it took, where the numbers go (`$OUT/<name>.jsonl`, one JSON object per line, flushed as it goes, so a run cut
off by a time limit still leaves what it measured) and the summary table every benchmark prints last.

Every benchmark takes `--smoke`: tiny sizes on the CPU in fp32, so a test runs each code path in seconds. Smoke
numbers measure nothing. Import from a script in this folder with `from gpu_common import ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

# --- command line ----------------------------------------------------------------------------------------------------


def benchmark_parser(description: str, sections: tuple[str, ...]) -> argparse.ArgumentParser:
    """The flags every GPU benchmark shares: --smoke, --sections, --deadline-s."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU in fp32: runs every code path in seconds"
    )
    parser.add_argument("--sections", default=",".join(sections), help=f"comma-separated subset of {sections}")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="skip what would start later than this many seconds after launch (a time-limited device call then "
        "ends with its table instead of being cut off mid-section)",
    )
    return parser


def chosen_sections(args: argparse.Namespace, sections: tuple[str, ...]) -> list[str]:
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in sections]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(sections)}")
    return chosen


def select_device(smoke: bool) -> str:
    """ "cuda" when there is one; a smoke run uses the CPU with one thread (its tiny ops gain nothing from more, and
    threads waiting on each other on a shared CPU turn milliseconds into seconds)."""
    if smoke:
        torch.set_num_threads(1)
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- machine and ceilings --------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    """Versions and hardware, recorded at the top of every results file."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    for module in ("transformers", "accelerate", "triton"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # absent or broken: say so rather than fail the benchmark
            info[module] = "missing"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    info["cpu"] = _cpu_name()
    info["cpu_count"] = os.cpu_count()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclasses.dataclass
class Ceilings:
    """What the device reaches at best, measured here (not the datasheet).

    matmul_flops: FLOP/s of a square bf16 matmul (fp32 under --smoke), the MFU denominator.
    copy_bytes: bytes copied per second by a device-to-device copy. Each byte is read once and written once, so the
    memory traffic is twice this; this rate is what the decode rooflines divide weight bytes by (as the anchors did).
    """

    matmul_flops: float
    copy_bytes: float

    def as_record(self) -> dict:
        """TFLOP/s and TB/s; `copy_traffic_tb_s` (read + write) is the figure the anchors list as copy bandwidth."""
        copy = self.copy_bytes / 1e12
        return dict(matmul_tflops=self.matmul_flops / 1e12, copy_tb_s=copy, copy_traffic_tb_s=2 * copy)


def measure_ceilings(device: str, smoke: bool) -> Ceilings:
    size = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    matmul = median_time(lambda: a @ b, device, warmup=3, iters=10).median_s
    source = torch.randn((2**18 if smoke else 2**28), device=device)  # 1 GiB of fp32 on the GPU
    target = torch.empty_like(source)
    copy = median_time(lambda: target.copy_(source), device, warmup=3, iters=10).median_s
    return Ceilings(matmul_flops=2 * size**3 / matmul, copy_bytes=source.numel() * source.element_size() / copy)


# --- timing and memory -----------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timing:
    median_s: float  # median of the timed calls
    warmup_s: float  # the warm-up calls together (compilation happens here)
    samples: list[float]


def median_time(fn: Callable[[], object], device: str, *, warmup: int = 2, iters: int = 5) -> Timing:
    """Run `fn` `warmup` times, then time `iters` calls one by one (device synced around each); median seconds."""
    sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    warmup_s = time.perf_counter() - start
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), warmup_s, samples)


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: str) -> float | None:
    """Peak bytes held by tensors since the last reset, in GiB (None on the CPU: not tracked there)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- results ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the final table. `ratio` is ours / peer; without a peer the target applies to `ours` itself.

    A target is a floor, or a ceiling when `lower_is_better` (memory). `peak_gib` and `mfu` are (ours, peer).
    """

    what: str
    ours: float | None
    peer: float | None = None
    unit: str = ""
    target: float | None = None
    lower_is_better: bool = False
    peak_gib: tuple[float | None, float | None] = (None, None)
    mfu: tuple[float | None, float | None] = (None, None)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or self.peer == 0:
            return None
        return self.ours / self.peer

    @property
    def met(self) -> bool | None:
        value = self.ratio if self.peer is not None else self.ours
        if self.target is None or value is None or not math.isfinite(value):
            return None
        return value <= self.target if self.lower_is_better else value >= self.target

    def as_record(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "met": self.met}


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f} %"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _pair(values: tuple[float | None, float | None], unit: str = "") -> str:
    ours, peer = values
    if ours is None and peer is None:
        return "-"
    return f"{_number(ours, unit)} / {_number(peer, unit)}" if peer is not None else _number(ours, unit)


def print_table(rows: list[Row], file=sys.stdout) -> None:
    """what | ours | peer | ratio | target | met? | peak GiB (ours / peer) | MFU (ours / peer)."""
    header = ("what", "ours", "peer", "ratio", "target", "met?", "peak GiB", "MFU")
    lines = []
    for row in rows:
        unit = f" {row.unit}" if row.unit and row.unit != "%" else ""
        target_unit = row.unit if row.peer is None else ""  # without a peer the target is in the value's unit
        bound = "<= " if row.lower_is_better else ">= "
        target = "-" if row.target is None else bound + _number(row.target, target_unit)
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        lines.append(
            (
                row.what,
                _number(row.ours, row.unit) + (unit if row.ours is not None else ""),
                _number(row.peer, row.unit) + (unit if row.peer is not None else ""),
                "-" if row.ratio is None else f"{row.ratio:.2f}x",
                target,
                met,
                _pair(row.peak_gib),
                _pair(row.mfu, "%"),
            )
        )
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    print(file=file)
    for cells in [header, tuple("-" * w for w in widths), *lines]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)), file=file)
    file.flush()


class Results:
    """Appends records to `$OUT/<name>.jsonl` (OUT defaults to the current folder) and collects table rows."""

    def __init__(self, name: str, deadline_s: float | None = None):
        folder = os.environ.get("OUT", ".")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{name}.jsonl")
        self.deadline_s = deadline_s
        self.start = time.perf_counter()
        self.rows: list[Row] = []

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def past_deadline(self) -> bool:
        return self.deadline_s is not None and self.elapsed_s() > self.deadline_s

    def record(self, section: str, **fields) -> dict:
        record = {"section": section, **fields, "t": round(self.elapsed_s(), 1)}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with open(self.path, "a") as log:
            log.write(line + "\n")
        return record

    def add_row(self, section: str, row: Row) -> None:
        self.rows.append(row)
        self.record(section, kind="row", **row.as_record())

    def guarded(self, name: str, device: str) -> Callable:
        """Decorator: run the section unless past the deadline; an exception is recorded and the next one runs."""

        def decorate(section: Callable[[], None]) -> Callable[[], None]:
            @functools.wraps(section)
            def run() -> None:
                if self.past_deadline():
                    self.record(name, kind="skipped", reason=f"past --deadline-s {self.deadline_s}")
                    return
                try:
                    section()
                except Exception as err:  # record and go on: one broken section must not cost the others
                    self.record(name, kind="error", error=repr(err)[:500], traceback=traceback.format_exc()[-2000:])
                finally:
                    free_memory(device)

            return run

        return decorate

    def finish(self) -> None:
        """The last record and the table, printed last."""
        self.record("done", results=self.path)
        print_table(self.rows)


def start_benchmark(
    args: argparse.Namespace, name: str, sections: tuple[str, ...]
) -> tuple[list[str], str, Results, Ceilings]:
    """What every benchmark does first: pick sections and device, open `$OUT/<name>.jsonl`, record the machine and
    the measured ceilings. Returns (sections, device, results, ceilings)."""
    chosen = chosen_sections(args, sections)
    device = select_device(args.smoke)
    results = Results(name, args.deadline_s)
    results.record("env", **machine_info(device), smoke=args.smoke, sections=chosen)
    ceilings = measure_ceilings(device, args.smoke)
    results.record("ceilings", **ceilings.as_record())
    return chosen, device, results, ceilings
