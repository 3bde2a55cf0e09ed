"""Compile the Triton gate kernels ahead of time for NVIDIA targets, with no GPU: proof that they build.

    python -m pfedmoap.ops.triton_aot            # every launchable variant, sm_80 and sm_90: one line each
    python -m pfedmoap.ops.triton_aot --markdown # the registers / spills table of kernels/README.md
    python -m pfedmoap.ops.triton_aot --covering # the subset CI compiles (every value of every axis)

A kernel that passes in the interpreter can still fail to compile for a GPU (tile shapes, ``tl.dot``'s
constraints, types). ``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` runs the whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, and ptxas, which ships in the triton wheel, for the cubin) without a driver.
Registers and spills come from ptxas's ``-v`` report on the PTX, run with the flags Triton's own cubin step
uses.

What is compiled is what :mod:`pfedmoap.ops.triton_gate` can launch: its tile choice
(``_launch_config``) over batch sizes and gate widths, head counts up to 32, each input dtype, and the forward
kernel's ``HAS_LOCAL`` and ``NEED_WEIGHTS`` flags. Integer arguments are compiled unspecialised (the
runtime JIT may also build variants for integers divisible by 16 or equal to 1; those are not covered).
Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

TARGETS = {"sm_80": 80, "sm_90": 90}
DTYPES = ("fp32", "fp16", "bf16")
# gate widths d and batch sizes the dispatch sees: train batches (16, 32), eval batches (512), odd sizes
WIDTHS = (8, 16, 32, 48, 64, 128, 256, 512, 1024)
BATCHES = (1, 16, 32, 64, 512)
MAX_HEADS = 32
KERNELS = ("gate_score_fwd_kernel", "gate_score_bwd_query_kernel", "gate_score_bwd_expert_kernel")
# the most shared memory one block may use (the opt-in maximum): A100 163 KB, H100 227 KB
MAX_SHARED = {"sm_80": 166912, "sm_90": 232448}
# pointers that hold the input dtype (the rest are fp32 buffers the op allocates)
_INPUT_POINTERS = {"q_ptr", "u_ptr", "k_ptr", "v_ptr", "local_ptr"}
_FLOAT_SCALARS = {"gamma", "lam"}


@dataclass(frozen=True)
class Variant:
    kernel: str
    target: str
    dtype: str
    block_b: int
    d_pad: int
    h_pad: int
    num_warps: int = 4
    has_local: bool | None = None  # forward kernel only
    need_weights: bool | None = None

    @property
    def label(self) -> str:
        flags = (
            "" if self.has_local is None else f" HAS_LOCAL={int(self.has_local)} NEED_WEIGHTS={int(self.need_weights)}"
        )
        return (
            f"{self.kernel} {self.target} {self.dtype} BLOCK_B={self.block_b} D_PAD={self.d_pad} H_PAD={self.h_pad} "
            f"num_warps={self.num_warps}" + flags
        )


@dataclass(frozen=True)
class Compiled:
    variant: Variant
    ok: bool
    seconds: float
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    ptx_bytes: int = 0
    cubin_bytes: int = 0
    error: str = ""


def launch_shapes() -> list[tuple[int, int, int, int]]:
    """Every (BLOCK_B, D_PAD, H_PAD, num_warps) the dispatch picks for the widths, batches and head counts above."""
    from . import triton_gate

    shapes = set()
    for dim, batch in itertools.product(WIDTHS, BATCHES):
        for heads in range(1, min(dim, MAX_HEADS) + 1):
            if dim % heads == 0:
                shapes.add(triton_gate._launch_config(batch, dim, heads))
    return sorted(shapes)


def variants(targets: Iterable[str] = TARGETS, dtypes: Iterable[str] = DTYPES) -> list[Variant]:
    """The full product: each kernel x target x dtype x launchable shape (x the forward's two flags)."""
    out = []
    for target, dtype, shape in itertools.product(targets, dtypes, launch_shapes()):
        for has_local, need_weights in itertools.product((False, True), repeat=2):
            out.append(Variant(KERNELS[0], target, dtype, *shape, has_local, need_weights))
        for kernel in KERNELS[1:]:
            if kernel == "gate_score_bwd_expert_kernel" and shape[1] > _expert_kernel_max_d_pad():
                continue  # the dispatch computes these widths' expert gradients in torch
            out.append(Variant(kernel, target, dtype, *shape))
    return out


def _expert_kernel_max_d_pad() -> int:
    from . import triton_gate

    return triton_gate.EXPERT_KERNEL_MAX_D_PAD


def covering_variants(targets: Iterable[str] = TARGETS) -> list[Variant]:
    """A subset that still exercises every value of every axis: each launchable shape for each kernel at fp32
    (the forward with both flags on, its longest code path), and every dtype x flag combination at the paper's
    gate shape (d = 128 with 8 heads)."""
    full = variants(targets)
    defaults = {shape for shape in launch_shapes() if shape[1:3] == (128, 16)}
    keep = [
        v
        for v in full
        if (v.dtype == "fp32" and v.has_local in (None, True) and v.need_weights in (None, True))
        or (v.block_b, v.d_pad, v.h_pad, v.num_warps) in defaults
    ]
    return keep


def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.isupper():  # BLOCK_B, D_PAD, ...: the constexprs (B, C, E, D, H are runtime integers)
            sig[name] = "constexpr" if name in ("BLOCK_B", "D_PAD", "H_PAD", "HAS_LOCAL", "NEED_WEIGHTS") else "i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in _INPUT_POINTERS else "*fp32"
        else:
            sig[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return sig


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton's own cubin step uses (the one in the triton wheel, unless TRITON_PTXAS_PATH is set)."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    if inspect.signature(nv.get_ptxas).parameters:  # triton >= 3.5 picks a ptxas per architecture
        return nv.get_ptxas(capability).path
    return nv.get_ptxas().path


def _triton_ptxas_flags() -> list[str]:
    """The register-allocation flag the installed Triton passes to ptxas: 3.8 adds ``--regAllocOptLevel=2`` (a
    ptxas 13 workaround), 3.6 does not. The flag changes the allocation, so the report must match the version."""
    import inspect

    from triton.backends.nvidia import compiler as nv

    return ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin) else []


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``, with Triton's cubin flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas_path(capability), "-lineinfo", "-v", *_triton_ptxas_flags(), f"--gpu-name={arch}", src]
        cmd += ["-o", os.path.join(tmp, "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[:300]!r}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_variant(variant: Variant) -> Compiled:
    """Compile one variant to PTX and cubin; never raises (a failure is ``ok=False`` with its error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_gate

    kernels = triton_gate._load_kernels()
    fn = getattr(kernels, variant.kernel)
    constexprs: dict[str, int | bool] = {"BLOCK_B": variant.block_b, "D_PAD": variant.d_pad, "H_PAD": variant.h_pad}
    if variant.has_local is not None:
        constexprs.update(HAS_LOCAL=variant.has_local, NEED_WEIGHTS=variant.need_weights)
    t0 = time.perf_counter()
    try:
        source = ASTSource(fn=fn, signature=_signature(fn, variant.dtype), constexprs=constexprs)
        target = GPUTarget("cuda", TARGETS[variant.target], 32)
        compiled = triton.compile(source, target=target, options={"num_warps": variant.num_warps})
        ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
        arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        regs, stores, loads = _ptxas_report(ptx, arch, TARGETS[variant.target])
    except Exception as exc:  # report every failure, do not stop at the first
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
        return Compiled(variant, False, time.perf_counter() - t0, error=message)
    return Compiled(
        variant,
        True,
        time.perf_counter() - t0,
        registers=regs,
        spill_stores=stores,
        spill_loads=loads,
        shared=int(compiled.metadata.shared),
        ptx_bytes=len(ptx),
        cubin_bytes=len(cubin),
    )


def compile_all(items: list[Variant], workers: int = 1) -> list[Compiled]:
    """Compile every variant (in ``workers`` processes: LLVM and ptxas are single-threaded)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels, there is nothing to compile")
    if workers <= 1:
        return [compile_variant(v) for v in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_variant, items, chunksize=4))


def markdown(results: list[Compiled]) -> str:
    """Registers and spills per kernel and target: the range over all variants, and the worst variant."""
    import triton

    lines = [
        f"Triton {triton.__version__}, {len(results)} variants, {sum(r.ok for r in results)} compiled.",
        "",
        "| kernel | target | variants | registers (min-max) | spill stores / loads (max bytes) | shared memory (max) "
        "| most registers at |",
        "|---|---|---|---|---|---|---|",
    ]
    for kernel, target in itertools.product(KERNELS, TARGETS):
        group = [r for r in results if r.ok and r.variant.kernel == kernel and r.variant.target == target]
        if not group:
            continue
        worst = max(group, key=lambda r: (r.registers, r.spill_stores))
        v = worst.variant
        at = f"{v.dtype}, BLOCK_B={v.block_b}, D_PAD={v.d_pad}, H_PAD={v.h_pad}, {v.num_warps} warps"
        lines.append(
            f"| `{kernel}` | {target} | {len(group)} | {min(r.registers for r in group)}-"
            f"{max(r.registers for r in group)} | {max(r.spill_stores for r in group)} / "
            f"{max(r.spill_loads for r in group)} | {max(r.shared for r in group)} B | {at} |"
        )
    return "\n".join(lines)


def load_json(path: str) -> list[Compiled]:
    """Results written by ``--json`` (to print their table without compiling again)."""
    import json

    with open(path) as f:
        rows = json.load(f)
    return [Compiled(**{**r, "variant": Variant(**r["variant"])}) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pfedmoap.ops.triton_aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--markdown", action="store_true", help="print the registers / spills table")
    p.add_argument("--covering", action="store_true", help="only the covering subset (what CI compiles)")
    p.add_argument("--json", metavar="PATH", help="also write every variant's result to PATH")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for name, values, valid in (("targets", targets, TARGETS), ("dtypes", dtypes, DTYPES)):
        bad = [v for v in values if v not in valid]
        if bad:
            print(f"{p.prog}: error: {name}={bad[0]!r} is not one of: {', '.join(valid)}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    items = covering_variants(targets) if args.covering else variants(targets, dtypes)
    items = [v for v in items if v.dtype in dtypes]
    results = compile_all(items, args.workers)
    if args.json:
        import json
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    if args.markdown:
        print(markdown(results))
    else:
        for r in results:
            status = f"{r.registers} regs, {r.spill_stores}/{r.spill_loads} B spilled" if r.ok else f"FAILED {r.error}"
            print(f"{r.variant.label}: {status} ({r.seconds:.1f} s)")
    print(
        f"{len(results) - len(failed)}/{len(results)} variants compiled in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
