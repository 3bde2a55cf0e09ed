"""The benchmark harness: sizes per device, timing (warm-up, interleaved repeats, medians), peak memory, op tables."""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pfedmoap import ops
from pfedmoap.base import tracing as prof
from pfedmoap.ops import OpTable

PAPER_PROMPT_VALUES = 16 * 512  # n_ctx x W for RN50 / ViT-B/16 (SPEC §2)
SECTIONS = ("bytes", "knn", "gate", "round", "efficiency", "text-encoder", "parallel")
DEFAULT_SECTIONS = ("bytes", "knn", "gate", "round", "efficiency")

# one- to four-word class names, like the CLIP benchmarks' ("english marigold", "giant white arum lily")
_WORDS = (
    "red white giant black small common great yellow blue spotted wild sea mountain garden desert "
    "lily rose orchid daisy poppy tulip iris lotus aster violet sparrow hawk eagle heron owl finch "
    "terrier spaniel retriever shepherd hound beagle pizza salad soup cake bread pasta curry taco"
).split()


def class_names(count: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        words = int(torch.randint(1, 5, (1,), generator=g))
        picks = torch.randint(0, len(_WORDS), (words,), generator=g).tolist()
        names.append(" ".join(_WORDS[p] for p in picks) + f" {i}")
    return names


# ---------------------------------------------------------------------------------------------- sizes
def _grid(batches: list[int], classes: list[int], experts: list[int]) -> list[tuple[int, int, int]]:
    return [(b, c, e) for b in batches for c in classes for e in experts]


@dataclass
class Sizes:
    """What a run measures. ``smoke`` takes seconds (CI), ``cpu`` a few minutes on 2 cores, ``full`` is for GPUs."""

    models: list[str]
    classes: list[int]
    d_gate: int = 128
    heads: int = 8
    experts: int = 9
    shots: int = 16
    batch: int = 16
    epochs: int = 5
    clients: int = 10  # pathological split: a client owns round(C / clients) classes
    repeats: int = 3
    eval_batch: int = 16
    accuracy_round: bool = True
    accuracy_epochs: int | None = None  # local epochs of the end-to-end rounds of ours (None: ``epochs``)
    # (B, C, E) shapes of the gate section; CPU default: the corners that finish in about a minute on 2 cores
    gate_shapes: list[tuple[int, int, int]] = field(
        default_factory=lambda: [
            (16, 10, 2),
            (16, 10, 40),
            (16, 1000, 2),
            (16, 1000, 40),
            (256, 10, 10),
            (64, 1000, 10),
        ]
    )
    gate_repeats: int = 3
    knn_pools: list[int] = field(default_factory=lambda: [100, 1000, 10000])
    knn_frac: float = 0.1  # queries per round = this fraction of the pool (the sampled clients)
    knn_k: int = 9
    knn_loop_queries: int = 3
    knn_reference_max_pool: int = 1000  # above this the reference knn backend is timed only if it is the only one
    knn_repeats: int = 3
    eff_classes: list[int] = field(default_factory=lambda: [10, 102])
    text_classes: list[int] = field(default_factory=lambda: [10, 102])
    text_modes: list[str] = field(default_factory=lambda: ["full", "truncated", "shared-prefix"])
    parallel_epochs: int = 5  # local epochs of the parallel section's round (the CPU size shortens it)


SIZES = {
    "smoke": Sizes(
        models=["pfedmoap-tiny"],
        classes=[10, 20],
        d_gate=32,
        repeats=2,
        epochs=2,
        gate_shapes=_grid([4, 16], [5, 20], [2, 5]),
        gate_repeats=2,
        knn_pools=[50, 200],
        knn_loop_queries=2,
        knn_repeats=2,
        eff_classes=[10],
        text_classes=[10],
        parallel_epochs=1,
    ),
    # the end-to-end rounds of ours run 2 local epochs (20 steps at C = 102) to stay within 5 minutes
    "cpu": Sizes(models=["ViT-B-16"], classes=[10, 102], accuracy_epochs=2, parallel_epochs=1),
    "full": Sizes(
        models=["RN50", "ViT-B-16"],
        classes=[10, 102],
        repeats=5,
        eval_batch=256,
        gate_shapes=_grid([16, 64, 256], [10, 100, 1000], [2, 10, 20, 40]),
        gate_repeats=5,
        knn_pools=[100, 1000, 10000, 100000],
        knn_loop_queries=8,
        knn_repeats=5,
        eff_classes=[10, 102, 1000],
        text_classes=[10, 102, 1000],
    ),
}


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


def _malloc_in_use() -> Callable[[], int] | None:
    """Bytes currently allocated through glibc malloc (heap + mmapped chunks), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


_IN_USE = _malloc_in_use()


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float | None]) -> Iterator[None]:
    """Peak memory the block allocated above what was in use when it started, in MiB.

    CUDA: ``max_memory_allocated``. CPU: glibc's in-use bytes (mallinfo2: heap + mmapped chunks, where torch's CPU
    tensors live), sampled every millisecond by a thread (torch ops release the GIL); None where unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    if _IN_USE is None:
        yield
        out["peak_mib"] = None
        return
    base = _IN_USE()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _IN_USE())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        peak[0] = max(peak[0], _IN_USE())
        done.set()
        thread.join()
    out["peak_mib"] = max(0, peak[0] - base) / 2**20


def measure(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    warmup: bool = True,
    slow_s: float = 5.0,
    cap_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Warm up each variant once (recording its peak memory), then interleave them ``repeats`` times; medians.

    A variant whose warm-up took longer than ``slow_s`` (a reference-style step on a CPU) counts the warm-up
    as its first sample: start-up effects are small next to such a run, and it saves one long repeat. With
    ``cap_s``, a variant whose first sample took longer than that is not repeated (one sample).
    """
    stats: dict[str, dict[str, Any]] = {name: {"samples": []} for name in variants}
    if warmup:
        for name, fn in variants.items():
            with prof.nvtx_range(f"bench.warmup.{name}"), peak_memory(device, stats[name]):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                took = time.perf_counter() - t0
            if took > slow_s:
                stats[name]["samples"].append(took)
                stats[name]["warmup_counted"] = True
    for _ in range(repeats):
        for name, fn in variants.items():
            samples = stats[name]["samples"]
            if len(samples) >= repeats or (cap_s is not None and samples and samples[0] > cap_s):
                continue
            with prof.nvtx_range(f"bench.{name}"):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                stats[name]["samples"].append(time.perf_counter() - t0)
    for s in stats.values():
        s["seconds"] = statistics.median(s["samples"]) if s["samples"] else float("nan")
    return stats


def gemm_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[[], Any]:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return lambda: a @ b


def bench_ops(fused: bool) -> OpTable:
    """The op table ``--fused`` would give a run (``ops.select_ops``), except that Triton under TRITON_INTERPRET=1
    (CPU tensors) is not timed: the next fused backend (or the reference) takes its place. The interpreter is
    for tests; it is far too slow to time."""
    table = ops.select_ops(fused)
    if fused and not torch.cuda.is_available():
        pins = {}
        for op, backend in table.backends.items():
            if backend == "triton":
                others = [b for b in ops.available_backends()[op] if b not in ("triton", "reference")]
                pins[op] = others[0] if others else "reference"
        if pins:
            table = ops.select_ops(True, pins=pins)
    return table


def backend_label(table: OpTable, used: tuple[str, ...]) -> str:
    return ", ".join(f"{op}={table.backends[op]}" for op in used if op in table.backends)


def fused_differs(used: tuple[str, ...]) -> bool:
    ref, fused = bench_ops(False), bench_ops(True)
    return any(ref.backends[op] != fused.backends[op] for op in used)


def _interpreted(backend: str, device: torch.device) -> bool:
    """Triton under TRITON_INTERPRET=1 on CPU tensors: correct but far too slow to time."""
    return backend == "triton" and device.type == "cpu"
