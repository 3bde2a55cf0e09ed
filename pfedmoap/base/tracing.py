"""Profiling helpers: named ranges around every phase of a run, for Nsight Systems and torch.profiler.

    from pfedmoap.base.tracing import nvtx_range

    with nvtx_range("round"):
        ...

    @nvtx_range("evaluate")
    def evaluate(...): ...

Ranges are a true no-op unless profiling is switched on: by ``PFEDMOAP_NVTX=1`` in the environment,
``python -m pfedmoap.train --nvtx``, or :func:`enable`. Switched off, a range costs one object and a flag
test (well under a microsecond), and no profiler library is touched.

Switched on, each range is handed to the active backends:

- ``nvtx``: NVTX push/pop through the ``nvtx`` package (``pip install 'pfedmoap[profile]'``), in the
  ``pfedmoap`` domain; ``nsys profile --trace=nvtx`` records them (``profiling/nsys_round.sh``). Without
  an attached tool the calls are cheap no-ops. ``torch.cuda.nvtx`` is used only as a fallback when the
  package is missing and CUDA is present (it raises on CPU-only builds).
- ``torch``: ``torch.profiler.record_function``, so the same ranges appear in a torch.profiler trace and
  in :func:`range_summary`. Works on the CPU. :func:`torch_profile` switches it on for its block.

Any object with ``push(name)`` and ``pop()`` can be a backend (tests use a recorder).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, Protocol, TypeVar

ENV_VAR = "PFEDMOAP_NVTX"
DOMAIN = "pfedmoap"
T = TypeVar("T")

# The ranges the library emits, outermost first (documentation and the summary's order; any name works).
RANGES = (
    "round",
    "client_update",
    "server.select_experts",
    "encode_experts",
    "local_train",
    "step",
    "step.features",
    "step.text_encode",
    "step.gate",
    "step.backward",
    "step.optimizer",
    "server.aggregate",
    "evaluate",
)


class RangeBackend(Protocol):
    def push(self, name: str) -> None: ...

    def pop(self) -> None: ...


class NvtxBackend:
    """NVTX ranges via the ``nvtx`` package (or torch.cuda.nvtx when only that can work)."""

    def __init__(self, domain: str = DOMAIN):
        self.domain = domain
        self._push: Callable[[str], Any] | None = None
        self._pop: Callable[[], Any] | None = None
        self.reason = ""
        try:
            import nvtx  # type: ignore[import-not-found]

            self._push = functools.partial(_nvtx_push, nvtx.push_range, domain)
            self._pop = functools.partial(nvtx.pop_range, domain=domain)
            self.source = "nvtx"
        except ImportError:
            import torch

            if torch.cuda.is_available():  # torch.cuda.nvtx raises on CPU-only builds: only with a GPU
                self._push, self._pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
                self.source = "torch.cuda.nvtx"
            else:
                self.source = "none"
                self.reason = "the nvtx package is not installed (pip install 'pfedmoap[profile]')"

    @property
    def available(self) -> bool:
        return self._push is not None

    def push(self, name: str) -> None:
        if self._push is not None:
            self._push(name)

    def pop(self) -> None:
        if self._pop is not None:
            self._pop()


def _nvtx_push(push_range: Callable, domain: str, name: str) -> None:
    push_range(name, color=None, domain=domain)


class TorchBackend:
    """``torch.profiler.record_function`` ranges: visible to torch.profiler, on CPU and GPU alike."""

    def __init__(self) -> None:
        self._open: list[Any] = []
        self.names: set[str] = set()

    def push(self, name: str) -> None:
        from torch.autograd.profiler import record_function

        rf = record_function(name)
        rf.__enter__()
        self._open.append(rf)
        self.names.add(name)

    def pop(self) -> None:
        self._open.pop().__exit__(None, None, None)


_ENABLED = False
_BACKENDS: tuple[RangeBackend, ...] = ()
_NVTX: NvtxBackend | None = None


def _nvtx_backend() -> NvtxBackend:
    global _NVTX
    if _NVTX is None:
        _NVTX = NvtxBackend()
    return _NVTX


def enable(on: bool = True, backends: Sequence[RangeBackend] | None = None) -> None:
    """Switch ranges on (NVTX backend unless ``backends`` are given) or off."""
    global _ENABLED, _BACKENDS
    if not on:
        _ENABLED, _BACKENDS = False, ()
        return
    _BACKENDS = tuple(backends) if backends is not None else (_nvtx_backend(),)
    _ENABLED = True


def disable() -> None:
    enable(False)


def is_enabled() -> bool:
    return _ENABLED


def backends() -> tuple[RangeBackend, ...]:
    return _BACKENDS


@contextlib.contextmanager
def enabled(backends: Sequence[RangeBackend] | None = None) -> Iterator[None]:
    """Ranges on (with these backends) inside the block; the previous state comes back afterwards."""
    global _ENABLED, _BACKENDS
    previous = (_ENABLED, _BACKENDS)
    enable(True, backends)
    try:
        yield
    finally:
        _ENABLED, _BACKENDS = previous


def describe() -> str:
    """One line: whether ranges are on and where they go."""
    if not _ENABLED:
        return f"profiling ranges: off (set {ENV_VAR}=1 or --nvtx)"
    parts = []
    for b in _BACKENDS:
        if isinstance(b, NvtxBackend):
            parts.append(f"nvtx via {b.source}" + (f" ({b.reason})" if b.reason else ""))
        else:
            parts.append(type(b).__name__)
    return "profiling ranges: on -> " + ", ".join(parts)


class nvtx_range:  # noqa: N801 - used like a function: ``with nvtx_range("x")`` / ``@nvtx_range("x")``
    """A named range: a context manager, or a decorator (checked at every call, not at decoration)."""

    __slots__ = ("name", "_active")

    def __init__(self, name: str):
        self.name = name
        self._active: tuple[RangeBackend, ...] = ()

    def __enter__(self) -> nvtx_range:
        if _ENABLED:
            active = _BACKENDS
            for b in active:
                b.push(self.name)
            self._active = active
        return self

    def __exit__(self, *exc: object) -> None:
        active = self._active
        if active:
            self._active = ()
            for b in reversed(active):
                b.pop()

    def __call__(self, fn: Callable) -> Callable:
        name = self.name

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _ENABLED:
                return fn(*args, **kwargs)
            with nvtx_range(name):
                return fn(*args, **kwargs)

        return wrapper


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time the block takes to ``phases[name]`` (a round's ``phase_seconds``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] += time.perf_counter() - t0


def ranged(items: Iterable[T], name: str) -> Iterator[T]:
    """Iterate ``items`` with a range named ``name`` open around the loop body of each item.

    ``for cid in ranged(clients, "client_update"):`` opens the range when an item is handed out and closes
    it when the next one is asked for (``continue`` included) or the loop ends.
    """
    for item in items:
        with nvtx_range(name):
            yield item


# ------------------------------------------------------------------------------------------ torch.profiler
@contextlib.contextmanager
def torch_profile(
    trace: str | os.PathLike | None = None,
    summary: IO[str] | None = sys.stderr,
    nvtx: bool = False,
    record_shapes: bool = False,
) -> Iterator[Any]:
    """Run the block under torch.profiler with the library's ranges recorded (CPU, and CUDA if present).

    On exit writes a Chrome trace to ``trace`` (open it in chrome://tracing or Perfetto) and prints the
    per-range summary (:func:`format_summary`) to ``summary``. With ``nvtx`` the NVTX backend stays on too.
    Yields the profiler.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    # Kineto (the profiler's tracer) logs its stages and a failed GPU count on stderr, every level below 6; keep
    # stderr for the run's own lines (a bad input is one line there) unless the user asked for Kineto's
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    recorder = TorchBackend()
    chosen: list[RangeBackend] = [recorder]
    if nvtx:
        chosen.insert(0, _nvtx_backend())
    with profile(activities=activities, record_shapes=record_shapes) as prof, enabled(chosen):
        yield prof
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    if summary is not None:
        print(format_summary(range_summary(prof, recorder.names)), file=summary)
        if trace is not None:
            print(f"torch.profiler trace: {trace}", file=summary)


def range_summary(prof: Any, names: set[str] | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per-range totals from a finished torch.profiler run: name, calls, total and mean CPU (and CUDA) ms.

    Totals are inclusive (a range contains its children). ``names`` defaults to :data:`RANGES`.
    """
    wanted = set(names) if names else set(RANGES)
    order = {n: i for i, n in enumerate(RANGES)}
    rows = []
    for ev in prof.key_averages():
        if ev.key not in wanted:
            continue
        cpu_ms = ev.cpu_time_total / 1000.0
        row = {"range": ev.key, "calls": int(ev.count), "total_ms": cpu_ms, "mean_ms": cpu_ms / max(1, ev.count)}
        device_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0) or 0
        if device_us:
            row["device_ms"] = device_us / 1000.0
        rows.append(row)
    rows.sort(key=lambda r: (order.get(r["range"], len(order)), -r["total_ms"]))
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The per-range summary as a fixed-width table."""
    lines = [f"{'range':<26} {'calls':>7} {'total ms':>12} {'mean ms':>10}"]
    for r in rows:
        lines.append(f"{r['range']:<26} {r['calls']:>7} {r['total_ms']:>12.1f} {r['mean_ms']:>10.3f}")
    if not rows:
        lines.append("(no pfedmoap ranges were recorded)")
    return "\n".join(lines)


if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
    enable()
