"""The ``cpp`` backend: ops of the compiled extension ``pfedmoap._C`` (csrc/), with the reference signatures.

- :func:`assemble_prompts`: batched expert prompt assembly, CPU (OpenMP) and CUDA, with a backward that gives
  the gradient of the contexts (prefix and suffix are frozen).
- :func:`knn`: nearest pool entries: blocked float32 GEMM distances (queries x pool) filter the candidates
  with a rigorous rounding bound, and the few that could be among the k nearest are re-ranked exactly, so the
  result equals the reference's, ties and near-ties included (csrc/knn.cpp derives the bound). CPU (OpenMP)
  and CUDA; a float64 pool keeps a float64 GEMM.

Inputs the extension cannot take (CUDA tensors when it was built without CUDA, other devices, a prefix or suffix
that needs a gradient) go to the reference implementation, so a call never fails for lack of a kernel.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import reference

_C: ModuleType | None = None
_REASON = ""
_TRIED = False
BUILD_RECORD = "_C.build.json"  # written by setup.py beside the library: the torch it was built against


def _load() -> ModuleType | None:
    """Import the extension once; remember why it failed."""
    global _C, _REASON, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            _C = importlib.import_module("pfedmoap._C")
        except ModuleNotFoundError as exc:
            if exc.name != "pfedmoap._C":
                raise
            _REASON = _missing_reason()
        except ImportError as exc:  # built against another torch, missing shared library, ...
            _REASON = _import_failure_reason(exc)
    return _C


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def _libraries(folder: Path) -> list[Path]:
    return [p for suffix in importlib.machinery.EXTENSION_SUFFIXES for p in sorted(folder.glob(f"_C{suffix}"))]


def _missing_reason() -> str:
    """Why ``pfedmoap._C`` is not there: never built, or built into an installed copy that this process's source
    tree shadows (``python -m`` from a checkout imports the checkout first)."""
    here = _package_dir()
    for entry in sys.path:
        other = Path(entry or ".").resolve() / "pfedmoap"
        if other != here and other.is_dir() and _libraries(other):
            return (
                f"pfedmoap._C is built in {other} but this process imports pfedmoap from the source tree at {here}, "
                "which shadows it: build it in place (pip install -e . or python setup.py build_ext --inplace) "
                "or run from outside the checkout"
            )
    return f"pfedmoap._C is not built (no library in {here}): run pip install . (needs a C++ compiler)"


def _built_for() -> str | None:
    """The torch version setup.py recorded beside the library, or None."""
    try:
        return json.loads((_package_dir() / BUILD_RECORD).read_text()).get("torch")
    except (OSError, ValueError, AttributeError):
        return None


def build_warning() -> str:
    """A note when the extension that loaded was built against another torch than this process runs ('' if not).

    pip's isolated build may pick a newer torch than the one installed; the library can still import (as seen
    with 2.15.0 built, 2.14.1 run) but nothing guarantees the two agree."""
    built_for = _built_for()
    if _load() is None or not built_for or built_for == torch.__version__:
        return ""
    return (
        f"pfedmoap._C was built against torch {built_for} and runs under torch {torch.__version__}: it imported, "
        "but rebuild it against this torch to be safe (pip install --no-build-isolation .)"
    )


def _import_failure_reason(exc: ImportError) -> str:
    """Why a library that is there does not import; names the torch it was built for when setup.py recorded it."""
    found = _libraries(_package_dir())
    where = str(found[0]) if found else "pfedmoap._C"
    built_for = _built_for()
    if built_for and built_for != torch.__version__:
        return (
            f"{where} was built for torch {built_for}, this is torch {torch.__version__}: rebuild it against this "
            "torch (pip install --no-build-isolation ., or pip install -e . in a checkout)"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{where} is built but cannot be imported ({first}); rebuild it: pip install --no-build-isolation ."


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _REASON


def cuda_built() -> bool:
    """Whether the extension has its CUDA kernels (False when it is missing)."""
    ext = _load()
    return bool(ext is not None and ext.cuda_built())


def _runs_on(device: torch.device) -> bool:
    return available() and (device.type == "cpu" or (device.type == "cuda" and cuda_built()))


class _AssemblePrompts(torch.autograd.Function):
    """[prefix; ctx[e]; suffix] for every (expert, class); the gradient goes to ctx only."""

    @staticmethod
    def forward(ctx, prefix: torch.Tensor, suffix: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        ctx.dims = (contexts.shape[0], prefix.shape[0], prefix.shape[1], contexts.shape[1])
        return _C.assemble_prompts(prefix, suffix, contexts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        experts, classes, prefix_len, n_ctx = ctx.dims
        grad_ctx = None
        if ctx.needs_input_grad[2]:
            grad_ctx = _C.assemble_prompts_backward(grad, experts, classes, prefix_len, n_ctx)
        return None, None, grad_ctx


def assemble_prompts(prefix: torch.Tensor, suffix: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Token embeddings of every (expert, class) prompt, expert-major; as :func:`reference.assemble_prompts`."""
    usable = (
        _runs_on(prefix.device)
        and prefix.device == suffix.device == ctx.device
        and prefix.dim() == suffix.dim() == ctx.dim() == 3
        and not (prefix.requires_grad or suffix.requires_grad)  # the kernel gives no gradient to frozen parts
    )
    if not usable:
        return reference.assemble_prompts(prefix, suffix, ctx)
    # the reference casts ctx to the prefix dtype, then torch.cat promotes: the same here, before the kernel
    dtype = torch.promote_types(prefix.dtype, suffix.dtype)
    ctx = ctx.to(prefix.dtype).to(dtype)
    return _AssemblePrompts.apply(prefix.to(dtype), suffix.to(dtype), ctx)


def knn(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """For each query row id, the ids of its k nearest other present rows; as :func:`reference.knn`.

    A float32 GEMM (|a|^2 + |b|^2 - 2ab) with a proven error bound keeps every row that could be among the k
    nearest; those are re-ranked with exact distances, so the order equals the reference's (on CUDA, the
    reference run on CUDA, whose cdist may differ from the CPU's in the last bit).
    """
    if not _runs_on(pool.device) or pool.dim() < 1:
        return reference.knn(pool, present, queries, k)
    with torch.no_grad():
        present = torch.as_tensor(present, device=pool.device)
        queries = torch.as_tensor(queries, device=pool.device)
        return _C.knn(pool.detach(), present, queries, int(k))
