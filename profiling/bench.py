"""Benchmarks, measured side by side in one process; prints markdown tables and writes JSON.

    python profiling/bench.py                      # every default section, sizes for this device
    python profiling/bench.py --size smoke         # seconds: tiny model, tiny shapes (CI)
    python profiling/bench.py round knn --size cpu --json out.json
    python profiling/bench.py text-encoder --model ViT-B-16 --classes 10,102

Sections (default: all but text-encoder):
  bytes         bytes down / up per client and round through the library's own payload and wire code, vs the
                paper's figures (8,192 values per prompt; (K+1) x 8,192 down).
  knn           expert selection over pools of 100 .. 100,000 prompts (16 x 512 values each), one round's
                queries (--knn-frac of the pool): a per-pair Python loop vs torch.cdist + topk vs ``ops.knn``
                (every backend that can run here).
  gate          the gate + score op alone, forward + backward: the reference code's eager gate (query repeated
                per class, T_MoE materialised) vs ``ops.gate_score`` with each backend that can run here.
  round         one client round at paper shapes (5 local epochs, 16 shots, batch 16, K = 9, real-size
                architecture with random weights): the reference-style pipeline (profiling/refstyle.py) vs
                ours with the reference op backend vs ours with --fused; plus training / evaluation
                throughput (images/s), peak memory, the one-time feature-cache cost, a check that the
                reference-style pipeline computes the same logits, and a full round of ours per backend
                (same seed) comparing final accuracy and prompts.
  efficiency    useful FLOPs per second of the shared-prefix text-encoder training step (forward + backward,
                counting only the token positions and causal attention pairs it needs) / the measured rate
                of a same-dtype dense GEMM of comparable size.
  text-encoder  one training step with each prompt text encoder: full (77 tokens) vs truncated vs shared-prefix.
  parallel      one round's local training of 10 sampled clients (pFedMoAP with experts, K = 9) one after another
                vs in lock step (--parallel-clients: one text-encoder pass per step for all of them): torch ops
                dispatched (counted with a TorchDispatchMode: the same on every machine), wall time, and the
                trained prompts' largest difference; beside the reference pattern when `round` ran too.

Timing: every variant runs once as a warm-up (its peak memory is measured then), then the variants of a
section are interleaved within each of --repeats rounds and the median is taken, so that machine drift hits
them all alike and ratios survive noise. Round times are composed from measured medians: one-time costs
(expert encoding, selection) + steps x median step; ours is also run end to end once per backend and that
wall time is reported beside it. Random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from refstyle import RefStyleClient, RefStyleGate  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pfedmoap import ops  # noqa: E402
from pfedmoap.base import tracing as prof  # noqa: E402
from pfedmoap.engine.lockstep import train_together  # noqa: E402
from pfedmoap.federated import wire as comm  # noqa: E402
from pfedmoap.federated.client import Client, ClientData, TrainSettings  # noqa: E402
from pfedmoap.federated.prompt import PromptEncoder, init_prompt  # noqa: E402
from pfedmoap.federated.selection import KnnSelection  # noqa: E402
from pfedmoap.federated.server import Server  # noqa: E402
from pfedmoap.gates import AttentionGate, mixture_scorer, pfedmoap_logits  # noqa: E402
from pfedmoap.methods.pfedmoap import MixtureObjective  # noqa: E402
from pfedmoap.model.clip import FrozenCLIP, load_clip  # noqa: E402
from pfedmoap.ops import OpTable  # noqa: E402

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


# ---------------------------------------------------------------------------------------------- bytes
def bench_bytes(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    """Bytes per client and round, through the library's round driver: the method's payload, cast for the wire and
    counted by ``RoundDriver.dispatch``."""
    from pfedmoap import make_config
    from pfedmoap.engine.rounds import RoundDriver
    from pfedmoap.methods import create_method

    rows = []
    for k in sorted({9, 19, sizes.experts}):
        for dtype in ("float16", "float32"):
            for method in ("pfedmoap", "promptfl"):
                cfg = make_config("synthetic", method=method, clients=k + 1, experts=k, comm_dtype=dtype, n_ctx=16)
                clients = k + 1
                server = Server(clients, torch.zeros(16, 512), [16] * clients, 1.0, seed=0, selection=KnnSelection())
                g = torch.Generator().manual_seed(0)
                for cid in range(clients):
                    server.receive(cid, torch.randn(16, 512, generator=g) * 0.02)
                driver = RoundDriver(cfg, create_method(cfg), server)
                driver.begin(1)
                payload = driver.dispatch(0)
                down = driver.open_round.bytes_down[0]
                up = comm.nbytes([comm.to_wire(server.pool[0], dtype)])
                size = torch.empty(0, dtype=comm.wire_dtype(dtype)).element_size()
                n_down = (k + 1) if method == "pfedmoap" else 1
                paper_down = n_down * PAPER_PROMPT_VALUES * size
                paper_up = PAPER_PROMPT_VALUES * size
                rows.append(
                    {
                        "method": method,
                        "experts": k if method == "pfedmoap" else 0,
                        "dtype": dtype,
                        "values_per_prompt": PAPER_PROMPT_VALUES,
                        "prompts_down": len(payload.expert_ids) + (payload.global_prompt is not None),
                        "bytes_down": down,
                        "bytes_up": up,
                        "paper_bytes_down": paper_down,
                        "paper_bytes_up": paper_up,
                        "matches_paper": down == paper_down and up == paper_up,
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------- knn
def knn_loop(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> list[list[int]]:
    """The per-pair pattern: one distance computation per (query, candidate) pair in Python, then a sort."""
    out = []
    for q in queries.tolist():
        dists = []
        for j in range(pool.shape[0]):
            if j != q and bool(present[j]):
                dists.append((float(torch.dist(pool[q], pool[j])), j))
        dists.sort()
        out.append([j for _, j in dists[:k]])
    return out


def knn_cdist_topk(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(pool[queries], pool)
    d[torch.arange(len(queries), device=d.device), queries] = float("inf")
    d = d.masked_fill(~present[None, :], float("inf"))
    return torch.topk(d, k, dim=1, largest=False).indices


def bench_knn(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    impls = ops.available_backends()["knn"]
    rows = []
    for n in sizes.knn_pools:
        g = torch.Generator().manual_seed(n)
        pool = (torch.randn(n, PAPER_PROMPT_VALUES, generator=g) * 0.02).to(device)
        present = torch.ones(n, dtype=torch.bool, device=device)
        q = max(1, int(sizes.knn_frac * n))
        queries = torch.randperm(n, generator=g)[:q].to(device)
        k = min(sizes.knn_k, n - 1)
        loop_q = queries[: min(q, sizes.knn_loop_queries)]
        variants: dict[str, Callable[[], Any]] = {
            "loop": lambda pool=pool, present=present, loop_q=loop_q, k=k: knn_loop(pool, present, loop_q, k),
            "cdist+topk": lambda pool=pool, present=present, queries=queries, k=k: knn_cdist_topk(
                pool, present, queries, k
            ),
        }
        for b in impls:
            if b == "reference" and len(impls) > 1 and n > sizes.knn_reference_max_pool:
                continue  # exact difference-based distances in float64: minutes at 10,000 x 1,000 on a CPU

            knn = ops.select_ops(pins={"knn": b}).knn

            def ours(knn=knn, pool=pool, present=present, queries=queries, k=k):
                return knn(pool, present, queries, k)

            variants[f"ops.knn[{b}]"] = ours
        stats = measure(variants, sizes.knn_repeats, device, warmup=False, cap_s=10.0)
        expected = knn_loop(pool, present, loop_q, k)
        best = bench_ops(True).backends["knn"]
        scale = q / len(loop_q)
        loop_s = stats["loop"]["seconds"] * scale
        cdist_s = stats["cdist+topk"]["seconds"]
        for name, st in stats.items():
            seconds = loop_s if name == "loop" else st["seconds"]
            row = {
                "pool": n,
                "queries": q,
                "k": k,
                "variant": name,
                "seconds": seconds,
                "measured_queries": len(loop_q) if name == "loop" else q,
                "speedup_vs_loop": loop_s / seconds,
                "vs_cdist_topk": cdist_s / seconds,
            }
            if name.startswith("ops.knn["):
                b = name[len("ops.knn[") : -1]
                got = ops.select_ops(pins={"knn": b}).knn(pool, present, loop_q, k).tolist()
                row["matches_loop"] = got == expected
                row["best"] = b == best
            rows.append(row)
        timings = "  ".join(f"{r['variant']} {r['seconds']:.4f}s" for r in rows[-len(stats) :])
        print(f"  knn N={n:<7} Q={q:<6} {timings}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- gate
def bench_gate(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    d, heads, gamma = sizes.d_gate, sizes.heads, 100.0
    impls = [b for b in ops.available_backends()["gate_score"] if not _interpreted(b, device)]
    rows = []
    for b_size, n_cls, n_exp in sizes.gate_shapes:
        g = torch.Generator().manual_seed(b_size * 7 + n_cls * 13 + n_exp)
        query = F.normalize(torch.randn(b_size, d, generator=g), dim=-1).to(device)
        experts = F.normalize(torch.randn(n_exp, n_cls, d, generator=g), dim=-1).to(device)
        labels = torch.randint(0, n_cls, (b_size,), generator=g).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            gate = AttentionGate(d, heads, 10.0).to(device)
        ref_gate = RefStyleGate(d, heads, 10.0).to(device)
        ref_gate.load_state_dict(gate.state_dict())
        leaf = experts.clone().requires_grad_(True)

        def refstyle(train: bool, query=query, leaf=leaf, labels=labels, ref_gate=ref_gate):
            with torch.set_grad_enabled(train):
                moe, _ = ref_gate(query, leaf)
                logits = gamma * torch.bmm(query.unsqueeze(1), moe.permute(1, 2, 0)).squeeze(1)
                if train:
                    F.cross_entropy(logits, labels).backward()
            return logits

        def fused_op(train: bool, backend: str, query=query, leaf=leaf, labels=labels, gate=gate):
            gate_score = ops.select_ops(pins={"gate_score": backend}).gate_score
            with torch.set_grad_enabled(train):
                logits, _ = gate_score(query, leaf, *gate.weights(), heads=heads, scaling=10.0, gamma=gamma)
                if train:
                    F.cross_entropy(logits, labels).backward()
            return logits

        variants: dict[str, Callable[[], Any]] = {}
        for train in (True, False):
            tag = "train" if train else "eval"
            variants[f"refstyle eager|{tag}"] = lambda train=train, f=refstyle: f(train)
            for b in impls:
                variants[f"ops.gate_score[{b}]|{tag}"] = lambda train=train, b=b, f=fused_op: f(train, b)
        stats = measure(variants, sizes.gate_repeats, device)
        ref_logits = refstyle(False)
        base = {v: stats[f"refstyle eager|{v}"]["seconds"] for v in ("train", "eval")}
        for name, st in stats.items():
            variant, mode = name.split("|")
            row = {
                "batch": b_size,
                "classes": n_cls,
                "experts": n_exp,
                "d_gate": d,
                "variant": variant,
                "mode": mode,
                "seconds": st["seconds"],
                "peak_mib": st.get("peak_mib"),
                "speedup_vs_refstyle": base[mode] / st["seconds"],
            }
            if variant.startswith("ops.gate_score["):
                backend = variant[len("ops.gate_score[") : -1]
                row["max_abs_diff_vs_refstyle"] = float((fused_op(False, backend) - ref_logits).abs().max())
            rows.append(row)
        timings = "  ".join(f"{r['variant']}/{r['mode']} {r['seconds'] * 1e3:.2f}ms" for r in rows[-len(stats) :])
        print(f"  gate B={b_size:<4} C={n_cls:<5} E={n_exp:<3} {timings}", file=sys.stderr, flush=True)
    return rows


def _interpreted(backend: str, device: torch.device) -> bool:
    """Triton under TRITON_INTERPRET=1 on CPU tensors: correct but far too slow to time."""
    return backend == "triton" and device.type == "cpu"


# ---------------------------------------------------------------------------------------------- round
ROUND_OPS = ("gate_score", "knn", "assemble_prompts")


def bench_round(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    for n_cls in sizes.classes:
        rows.extend(_round_one(sizes, args, clip, n_cls))
    return rows


def _round_one(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP, n_cls: int) -> list[dict]:
    device = clip.device
    d, k, bsz = sizes.d_gate, sizes.experts, sizes.batch
    names = class_names(n_cls)
    owned = max(1, round(n_cls / sizes.clients))
    n_train = owned * sizes.shots
    steps = sizes.epochs * math.ceil(n_train / bsz)
    g = torch.Generator().manual_seed(1000 + n_cls)
    settings = TrainSettings(epochs=1, batch_size=bsz, momentum=0.9, weight_decay=5e-4)
    lr_prompt, lr_gate, lam = 0.002, 0.01, 0.5
    start = init_prompt(16, clip.width, 0.02, g)
    true_ctx = init_prompt(16, clip.width, 0.02, g)
    experts = torch.stack([true_ctx + init_prompt(16, clip.width, 0.01, g) for _ in range(k)])

    # one timing batch of B random images: the reference style encodes it every step, ours caches its features
    images = torch.randn(bsz, 3, clip.image_size, clip.image_size, generator=g).to(device)
    labels = torch.randint(0, owned, (bsz,), generator=g).to(device)
    eval_images = torch.randn(sizes.eval_batch, 3, clip.image_size, clip.image_size, generator=g).to(device)
    feats = clip.encode_images(images)
    eval_feats = clip.encode_images(eval_images)

    def make_gate(table: OpTable) -> AttentionGate:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            return AttentionGate(d, sizes.heads, 10.0, ops=table).to(device)

    class Column:
        """Ours with one op table, as a run holds it: its encoder, server (KNN) and gate use the table's ops."""

        def __init__(self, table: OpTable):
            self.table = table
            self.encoder = PromptEncoder(clip, names, 16, mode="shared-prefix", assemble=table.assemble_prompts)
            # the server side of selection: a pool of K + 1 clients, this client (0) included
            self.server = Server(
                k + 1, start, [n_train] * (k + 1), 1.0, seed=0, selection=KnnSelection(), knn=table.knn
            )
            self.server.receive(0, start)
            for j in range(k):
                self.server.receive(j + 1, experts[j])
            self.view = self.server.snapshot()
            data = ClientData(
                train_labels=labels.cpu(),
                test_labels=labels[:1].repeat(sizes.eval_batch).cpu(),
                test_features=eval_feats,
                train_features=feats,
            )
            self.client = Client(0, data, seed=4321)
            self.gate = make_gate(table)
            self.expert_text = self.experts()

        def experts(self) -> torch.Tensor:
            with torch.no_grad():
                return self.encoder.encode(experts)

        def step(self) -> None:
            # one local update over one batch: a fresh prompt from the start, the gate trained on (as a round does)
            objective = MixtureObjective(self.encoder, start, lr_prompt, self.gate, self.expert_text, lam, lr_gate)
            self.client.train(objective, settings, clip)

        def select(self) -> list[int]:
            return self.server.select_experts(0, self.view, k)

        def eval(self) -> float:
            with torch.no_grad():
                local = self.encoder.encode(start)
            return self.client.evaluate_with(
                mixture_scorer(local, self.expert_text, self.gate, clip.gamma, lam), weights=self.gate is not None
            )

    reference_column = Column(bench_ops(False))
    expert_text = {"t": reference_column.expert_text}
    encoder = reference_column.encoder

    ref = RefStyleClient(clip, names, 16, d, sizes.heads)
    ref.gate.load_state_dict(make_gate(reference_column.table).state_dict())
    ref.load_prompt(start)
    # its own 77-token pass for one expert (the timed variant runs one pass per repeat; a round costs K of them)
    first_expert = ref.encode_expert(experts[0])
    expert_diff = float((first_expert - expert_text["t"][0]).abs().max())
    ref.expert_text = [first_expert, *expert_text["t"][1:]]
    counter = {"i": 0}

    def ref_expert_pass() -> torch.Tensor:
        counter["i"] += 1
        return ref.encode_expert(experts[counter["i"] % k])

    def ref_step() -> float:
        return ref.step(images, labels)

    def ref_eval() -> torch.Tensor:
        return ref.eval_logits(eval_images)

    # same arithmetic: logits of both pipelines for the same weights and images, before any update
    with torch.no_grad():
        ours_logits, _ = pfedmoap_logits(
            feats, encoder.encode(start), expert_text["t"], reference_column.gate, clip.gamma, lam
        )
        ref_logits = ref.logits(images)
    logit_diff = float((ours_logits - ref_logits).abs().max())
    logit_scale = float(ours_logits.abs().max())

    variants: dict[str, Callable[[], Any]] = {
        "refstyle.step": ref_step,
        "refstyle.expert_pass": ref_expert_pass,
        "refstyle.eval": ref_eval,
        "image_batch": lambda: clip.encode_images(images),
    }
    if sizes.eval_batch != bsz:
        variants["image_eval_batch"] = lambda: clip.encode_images(eval_images)
    columns = [("reference", False)]
    if fused_differs(ROUND_OPS):
        columns.append(("fused", True))
    tables = {label: bench_ops(fused) for label, fused in columns}
    for label, _ in columns:
        col = reference_column if label == "reference" else Column(tables[label])
        variants[f"ours[{label}].step"] = col.step
        variants[f"ours[{label}].experts"] = col.experts
        variants[f"ours[{label}].select"] = col.select
        variants[f"ours[{label}].eval"] = col.eval
    print(f"  round {clip.model_name} C={n_cls}: {steps} steps; timing {len(variants)} variants", file=sys.stderr)
    stats = measure(variants, sizes.repeats, device)
    sec = {name: st["seconds"] for name, st in stats.items()}
    sec.setdefault("image_eval_batch", sec["image_batch"])
    mem = {name: st.get("peak_mib") for name, st in stats.items()}

    # full rounds of ours, one per backend column, same seed: the trained outcome must agree
    outcomes = {}
    if sizes.accuracy_round:
        outcomes = _accuracy_rounds(
            sizes, clip, names, n_cls, owned, start, true_ctx, experts, settings, tables, make_gate
        )

    ref_round = k * sec["refstyle.expert_pass"] + steps * sec["refstyle.step"]
    cache_once = math.ceil(n_train / bsz) * sec["image_batch"]
    common = {
        "model": clip.model_name,
        "classes": n_cls,
        "client_classes": owned,
        "train_images": n_train,
        "steps": steps,
        "experts": k,
        "batch": bsz,
        "prompt_tokens_refstyle": ref.prompts.length,
        "prompt_tokens_ours": encoder.length,
        "logit_max_abs_diff_refstyle_vs_ours": logit_diff,
        "logit_max_abs": logit_scale,
        "expert_feature_max_abs_diff_refstyle_vs_ours": expert_diff,
    }
    rows = [
        {
            **common,
            "variant": "reference-style",
            "backends": "n/a (profiling/refstyle.py, eager torch)",
            "step_s": sec["refstyle.step"],
            "experts_s": k * sec["refstyle.expert_pass"],
            "round_s": ref_round,
            "speedup": 1.0,
            "train_img_s": steps * bsz / ref_round,
            "eval_img_s": sizes.eval_batch / sec["refstyle.eval"],
            "step_peak_mib": mem["refstyle.step"],
        }
    ]
    for label, fused in columns:
        used = backend_label(tables[label], ROUND_OPS)
        p = f"ours[{label}]"
        one_time = sec[f"{p}.select"] + sec[f"{p}.experts"]
        round_s = one_time + steps * sec[f"{p}.step"]
        row = {
            **common,
            "variant": "ours --fused" if fused else "ours (reference ops)",
            "backends": used,
            "step_s": sec[f"{p}.step"],
            "experts_s": sec[f"{p}.experts"],
            "select_s": sec[f"{p}.select"],
            "round_s": round_s,
            "speedup": ref_round / round_s,
            "feature_cache_once_s": cache_once,
            "speedup_incl_feature_cache": ref_round / (round_s + cache_once),
            "train_img_s": steps * bsz / round_s,
            "eval_img_s": sizes.eval_batch / sec[f"{p}.eval"],
            "eval_img_s_incl_image_encoder": sizes.eval_batch / (sec[f"{p}.eval"] + sec["image_eval_batch"]),
            "step_peak_mib": mem[f"{p}.step"],
        }
        if label in outcomes:
            row.update(outcomes[label])
            measured_steps = outcomes[label]["round_measured_epochs"] * math.ceil(n_train / bsz)
            row["round_composed_for_measured_s"] = one_time + measured_steps * sec[f"{p}.step"]
        rows.append(row)
    if len(columns) == 1:
        reasons = ops.unavailable_backends()
        fused_row = dict(rows[-1])
        fused_row["variant"] = "ours --fused"
        label = backend_label(bench_ops(True), ROUND_OPS)
        fused_row["backends"] = label + " (no fused backend runs here: same as above)"
        fused_row["fused_unavailable"] = reasons
        rows.append(fused_row)
    if "reference" in outcomes and "fused" in outcomes:
        ref_prompt, fused_prompt = outcomes["reference"]["_prompt"], outcomes["fused"]["_prompt"]
        rows[-1]["prompt_max_abs_diff_vs_reference"] = float((ref_prompt - fused_prompt).abs().max())
    for r in rows:
        r.pop("_prompt", None)
    for r in rows:
        print(
            f"    {r['variant']:<22} step {r['step_s'] * 1e3:9.1f} ms  round {r['round_s']:8.2f} s  "
            f"x{r['speedup']:.1f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _accuracy_rounds(sizes, clip, names, n_cls, owned, start, true_ctx, experts, settings, tables, make_gate) -> dict:
    """One full local round of ours per op table, same seed, on class-structured features.

    The image features of class c are the text features of class c under a hidden context, plus noise: the
    prompt has something to learn, so the accuracy means something, and both columns must end the same.
    """
    g = torch.Generator().manual_seed(77 + n_cls)
    probe = PromptEncoder(clip, names, 16, mode="shared-prefix")
    with torch.no_grad():
        centres = probe.encode(true_ctx)  # [C, D]
    n_train, n_test = owned * sizes.shots, owned * sizes.shots

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % owned
        noise = torch.randn(n, centres.shape[1], generator=g).to(clip.device) / math.sqrt(centres.shape[1])
        return F.normalize(centres[y.to(clip.device)] + 0.5 * noise, dim=-1), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    epochs = sizes.accuracy_epochs or sizes.epochs
    full = replace(settings, epochs=epochs)
    out = {}
    for label, table in tables.items():
        encoder = PromptEncoder(clip, names, 16, mode="shared-prefix", assemble=table.assemble_prompts)
        data = ClientData(train_labels=train_y, test_labels=test_y, test_features=test_x, train_features=train_x)
        client = Client(0, data, seed=4321)
        gate = make_gate(table)
        t0 = time.perf_counter()
        with torch.no_grad():
            expert_text = encoder.encode(experts)
        objective = MixtureObjective(encoder, start, 0.002, gate, expert_text, 0.5, 0.01)
        client.train(objective, full, clip)
        sync(clip.device)
        seconds = time.perf_counter() - t0
        prompt = objective.prompt.detach()
        with torch.no_grad():
            local = encoder.encode(prompt)
            acc = client.evaluate_with(mixture_scorer(local, expert_text, gate, clip.gamma, 0.5), weights=True)
            start_text = encoder.encode(start)
            start_acc = Client(0, data, seed=4321).evaluate_with(
                mixture_scorer(start_text, None, None, clip.gamma, 0.5)
            )
        out[label] = {
            "round_measured_s": seconds,
            "round_measured_epochs": epochs,
            "final_acc": acc,
            "start_acc": start_acc,
            "_prompt": prompt.cpu(),
        }
    return out


# ---------------------------------------------------------------------------------------------- efficiency
def text_step_flops(encoder: PromptEncoder) -> dict[str, float]:
    """FLOPs of one shared-prefix training step of the text encoder (local prompt, all C classes).

    Matmul FLOPs only (2 per multiply-add). Per layer and token: the block's linear layers (in-projection,
    out-projection, MLP); per (query, key) pair: 4 W (QK^T and attention x V). The CLIP weights are frozen, so
    backward needs input gradients only: linear layers cost 1x forward again, attention 2x (dQ, dK, dV, dP).
    ``useful`` counts each class's suffix only up to its EOT and only causally visible keys; ``executed`` counts
    what the shared-prefix encoder runs (linear layers on the packed tokens, attention padded to the longest EOT
    with full P + S score rows).
    """
    tower = encoder.clip.text
    blocks = tower.shared_prefix_blocks() or []
    width = tower.width
    per_token = 0
    for blk in blocks:
        per_token += 2 * blk.attn.in_proj_weight.numel() + 2 * blk.attn.out_proj.weight.numel()
        per_token += sum(2 * m.weight.numel() for m in blk.mlp.modules() if isinstance(m, torch.nn.Linear))
    layers = len(blocks)
    proj = tower.text_projection
    out_dim = proj.out_features if isinstance(proj, torch.nn.Linear) else (proj.shape[-1] if proj is not None else 0)
    n_pre = 1 + encoder.n_ctx
    n_suf = encoder.length - n_pre
    n_cls = encoder.num_classes
    suf_len = (encoder.eot.cpu() - n_pre + 1).tolist()
    pre_pairs = n_pre * (n_pre + 1) // 2

    def total(tokens: int, pairs: int) -> float:
        linear = per_token * tokens + 2 * n_cls * width * out_dim
        attention = layers * 4 * width * pairs
        return 2 * linear + 3 * attention

    useful_tokens = n_pre + sum(suf_len)
    useful_pairs = pre_pairs + sum(s * n_pre + s * (s + 1) // 2 for s in suf_len)
    # the linear layers run on the packed suffix stream (each class up to its own EOT); attention runs on
    # the padded [C, S] layout, with full P + S score rows
    exec_tokens = useful_tokens
    exec_pairs = n_pre * n_pre + n_cls * n_suf * (n_pre + n_suf)
    return {
        "useful_flops": total(useful_tokens, useful_pairs),
        "executed_flops": total(exec_tokens, exec_pairs),
        "useful_tokens": useful_tokens,
        "executed_tokens": exec_tokens,
        "mlp_hidden": max(
            (m.out_features for b in blocks for m in b.mlp.modules() if isinstance(m, torch.nn.Linear)), default=0
        ),
    }


def bench_efficiency(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    device = clip.device
    rows = []
    big = 4096 if device.type == "cuda" else 1024
    for n_cls in sizes.eff_classes:
        encoder = PromptEncoder(clip, class_names(n_cls), 16, mode="shared-prefix")
        flops = text_step_flops(encoder)
        g = torch.Generator().manual_seed(5)
        ctx = torch.nn.Parameter((torch.randn(16, clip.width, generator=g) * 0.02).to(device))
        upstream = torch.randn(n_cls, clip.embed_dim, generator=g).to(device)

        def text_step(encoder=encoder, ctx=ctx, upstream=upstream):
            ctx.grad = None
            (encoder.encode(ctx) * upstream).sum().backward()

        m = int(flops["executed_tokens"])
        hidden = int(flops["mlp_hidden"]) or 4 * clip.width
        variants = {
            "text_step": text_step,
            "gemm_comparable": gemm_rate(m, clip.width, hidden, device),
            "gemm_large": gemm_rate(big, big, big, device),
        }
        stats = measure(variants, max(3, sizes.repeats), device)
        t = stats["text_step"]["seconds"]
        comparable = 2 * m * clip.width * hidden / stats["gemm_comparable"]["seconds"]
        large = 2 * big**3 / stats["gemm_large"]["seconds"]
        useful_rate = flops["useful_flops"] / t
        rows.append(
            {
                "model": clip.model_name,
                "classes": n_cls,
                "dtype": "float32",
                "useful_tokens": flops["useful_tokens"],
                "executed_tokens": flops["executed_tokens"],
                "useful_gflop": flops["useful_flops"] / 1e9,
                "executed_gflop": flops["executed_flops"] / 1e9,
                "text_step_s": t,
                "useful_gflops": useful_rate / 1e9,
                "executed_gflops": flops["executed_flops"] / t / 1e9,
                "gemm_shape": f"{m}x{clip.width}x{hidden}",
                "gemm_comparable_gflops": comparable / 1e9,
                "gemm_large_shape": f"{big}x{big}x{big}",
                "gemm_large_gflops": large / 1e9,
                "efficiency": useful_rate / comparable,
                "efficiency_vs_large_gemm": useful_rate / large,
            }
        )
        r = rows[-1]
        print(
            f"  efficiency {clip.model_name} C={n_cls}: {r['useful_gflops']:.1f} useful GFLOP/s vs GEMM "
            f"{r['gemm_comparable_gflops']:.1f} ({r['efficiency']:.0%})",
            file=sys.stderr,
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- text encoder
def token_positions(enc: PromptEncoder, experts: int) -> int:
    """Token positions the text transformer processes for `experts` prompts over all classes."""
    n_cls = enc.num_classes
    if enc.mode == "shared-prefix":
        shared = 1 + enc.n_ctx
        return experts * (shared + n_cls * (enc.length - shared))
    return experts * n_cls * enc.length


def bench_text_encoder(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    device = clip.device
    for n_cls in sizes.text_classes:
        names = class_names(n_cls)
        d = sizes.d_gate
        image = F.normalize(torch.randn(sizes.batch, clip.embed_dim, device=device), dim=-1)
        labels = torch.randint(0, n_cls, (sizes.batch,), device=device)
        experts_ctx = torch.randn(sizes.experts, 16, clip.width, device=device) * 0.02
        steps, encoders = {}, {}
        for mode in sizes.text_modes:
            if mode == "full" and n_cls > args.full_max_classes:
                continue
            enc = PromptEncoder(clip, names, 16, mode=mode)
            with torch.no_grad():
                expert_text = enc.encode(experts_ctx)
            ctx = torch.nn.Parameter(torch.randn(16, clip.width, device=device) * 0.02)
            gate = AttentionGate(d, sizes.heads).to(device)
            opt = torch.optim.SGD([ctx, *gate.parameters()], lr=0.002, momentum=0.9, weight_decay=5e-4)

            def step(enc=enc, ctx=ctx, gate=gate, opt=opt, expert_text=expert_text, image=image, labels=labels, d=d):
                text = enc.encode(ctx)
                logits, _ = pfedmoap_logits(image, text, expert_text, gate, clip.gamma, 0.5, d)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[mode], encoders[mode] = step, enc
        stats = measure(steps, sizes.repeats, device)
        base = stats["truncated"]["seconds"] if "truncated" in stats else None
        for mode, st in stats.items():
            enc = encoders[mode]
            row = {
                "model": clip.model_name,
                "classes": n_cls,
                "mode": mode,
                "tokens_per_prompt": enc.length,
                "token_positions": token_positions(enc, 1),
                "step_seconds": st["seconds"],
                "repeats": len(st["samples"]),
            }
            if base:
                row["speedup_vs_truncated"] = base / st["seconds"]
            rows.append(row)
            print(f"  C={n_cls:<5} {mode:<14} {st['seconds'] * 1000:9.1f} ms/step", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- targets
class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, backward and optimiser alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def bench_parallel(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    for n_cls in sizes.classes:
        rows.extend(_parallel_one(sizes, clip, n_cls))
    return rows


def _parallel_one(sizes: Sizes, clip: FrozenCLIP, n_cls: int) -> list[dict]:
    """One round's local training of ``sizes.clients`` clients, each with its own prompt, gate, SGD and batch
    order, K experts each: sequential (``Client.train`` per client) vs lock step (``train_together``)."""
    device, m, k = clip.device, sizes.clients, sizes.experts
    names = class_names(n_cls)
    owned = max(1, round(n_cls / m))
    n_train = owned * sizes.shots
    g = torch.Generator().manual_seed(3000 + n_cls)
    encoder = PromptEncoder(clip, names, 16, mode="shared-prefix")
    start = init_prompt(16, clip.width, 0.02, g)
    pool = torch.stack([start + init_prompt(16, clip.width, 0.01, g) for _ in range(m)])
    settings = TrainSettings(epochs=sizes.parallel_epochs, batch_size=sizes.batch, momentum=0.9, weight_decay=5e-4)
    data = []
    for i in range(m):
        classes = [(i * owned + j) % n_cls for j in range(owned)]
        labels = torch.tensor(classes).repeat_interleave(sizes.shots)
        feats = F.normalize(torch.randn(n_train, clip.embed_dim, generator=g), dim=-1).to(device)
        data.append(
            ClientData(train_labels=labels, test_labels=labels[:1], test_features=feats[:1], train_features=feats)
        )
    with torch.no_grad():  # each client's K experts (the K others after it), encoded once per round
        expert_text = [encoder.encode(pool[[(i + 1 + j) % m for j in range(k)]]) for i in range(m)]
    table = bench_ops(False)

    def setup() -> tuple[list[Client], list[MixtureObjective]]:
        clients, objectives = [], []
        for i in range(m):
            client = Client(i, data[i], seed=500 + i)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(500 + i)
                gate = AttentionGate(sizes.d_gate, sizes.heads, 10.0, ops=table).to(device)
            clients.append(client)
            objectives.append(MixtureObjective(encoder, start, 0.002, gate, expert_text[i], 0.5, 0.01))
        return clients, objectives

    def sequential(clients: list[Client], objectives: list[MixtureObjective]) -> None:
        for client, objective in zip(clients, objectives, strict=True):
            client.train(objective, settings, clip)

    def together(clients: list[Client], objectives: list[MixtureObjective]) -> None:
        train_together(clients, objectives, settings, clip)

    counts, prompts = {}, {}
    for name, fn in (("sequential", sequential), ("lock step", together)):
        clients, objectives = setup()
        counter = OpCounter()  # the training only: the clients' and gates' set-up is the same either way
        with counter:
            fn(clients, objectives)
        counts[name] = counter.count
        prompts[name] = torch.stack([o.prompt.detach().cpu() for o in objectives])
    diff = float((prompts["sequential"] - prompts["lock step"]).abs().max())
    stats = measure(
        {"sequential": lambda: sequential(*setup()), "lock step": lambda: together(*setup())}, sizes.repeats, device
    )
    steps = settings.epochs * math.ceil(n_train / sizes.batch)
    rows = []
    for name in ("sequential", "lock step"):
        rows.append(
            {
                "model": clip.model_name,
                "classes": n_cls,
                "clients": m,
                "experts": k,
                "epochs": settings.epochs,
                "steps_per_client": steps,
                "variant": name,
                "ops": counts[name],
                "ops_ratio": counts["sequential"] / counts[name],
                "seconds": stats[name]["seconds"],
                "speedup": stats["sequential"]["seconds"] / stats[name]["seconds"],
                "prompt_max_abs_diff": diff,
            }
        )
    print(
        f"parallel {clip.model_name} C={n_cls}: ops {counts['sequential']:,} -> {counts['lock step']:,}, "
        f"{stats['sequential']['seconds']:.2f} s -> {stats['lock step']['seconds']:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return rows


def targets(results: dict[str, list[dict]], device: torch.device) -> list[dict]:
    """The issue's targets, evaluated on this run's ratios."""
    out = []
    gpu = device.type == "cuda"
    for r in results.get("round", []):
        if r["model"] != "ViT-B-16" or r["variant"] == "reference-style" or r["classes"] not in (10, 102):
            continue
        if r["variant"] == "ours --fused" or not any(
            x["variant"] == "ours --fused" for x in results["round"] if x["classes"] == r["classes"]
        ):
            goal = 10.0 if gpu else (12.0 if r["classes"] == 10 else 15.0)
            out.append(
                {
                    "target": f"one client round, ViT-B/16, C = {r['classes']}: >= {goal:g}x vs reference-style",
                    "measured": f"{r['speedup']:.1f}x",
                    "met": r["speedup"] >= goal,
                }
            )
    knn = [r for r in results.get("knn", []) if r["pool"] == 10000 and r.get("best")]
    for r in knn:
        out.append(
            {
                "target": "KNN at 10,000 prompts: >= 100x vs per-pair loop",
                "measured": f"{r['speedup_vs_loop']:.0f}x ({r['variant']})",
                "met": r["speedup_vs_loop"] >= 100,
            }
        )
        out.append(
            {
                "target": "KNN at 10,000 prompts: no slower than cdist + topk",
                "measured": f"{r['vs_cdist_topk']:.2f}x cdist+topk speed",
                "met": r["vs_cdist_topk"] >= 1.0,
            }
        )
    for r in results.get("parallel", []):
        if r["variant"] != "lock step":
            continue
        out.append(
            {
                "target": f"{r['clients']}-client round, {r['model']}, C = {r['classes']}: >= 8x fewer dispatched ops",
                "measured": f"{r['ops_ratio']:.1f}x",
                "met": r["ops_ratio"] >= 8,
            }
        )
        if device.type == "cpu" and r["classes"] == 10:
            out.append(
                {
                    "target": f"{r['clients']}-client round, {r['model']}, C = 10, CPU: lock step >= 1.3x sequential",
                    "measured": f"{r['speedup']:.2f}x",
                    "met": r["speedup"] >= 1.3,
                }
            )
    for r in results.get("efficiency", []):
        if device.type == "cpu":
            out.append(
                {
                    "target": f"text-encoder step >= 80% of dense GEMM rate (CPU, {r['model']}, C = {r['classes']})",
                    "measured": f"{r['efficiency']:.0%}",
                    "met": r["efficiency"] >= 0.8,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------- output
def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _table_head(header: str) -> list[str]:
    """A markdown table's header row and its separator (one ``---`` per column of ``header``)."""
    return [header, "|" + "---|" * (header.count("|") - 1)]


def _header(title: str, header: str) -> list[str]:
    """A titled markdown table's opening lines: title, blank line, header row, separator."""
    return [title, "", *_table_head(header)]


def markdown(results: dict[str, list[dict]], target_rows: list[dict]) -> str:
    parts = []
    if results.get("round"):
        r0 = results["round"][0]
        lines = _header(
            f"### One client round ({r0['steps'] // max(1, math.ceil(r0['train_images'] / r0['batch']))} local epochs, "
            f"{r0['train_images'] // r0['client_classes']} shots, batch {r0['batch']}, K = {r0['experts']})",
            "| model | C | steps | pipeline | op backends that ran | step (ms) | experts (ms) | round (s) | speed-up "
            "| train img/s | eval img/s | step peak MiB | final acc % | Δ prompt |",
        )
        for r in results["round"]:
            acc = r.get("final_acc")
            lines.append(
                f"| {r['model']} | {r['classes']} | {r['steps']} | {r['variant']} | {r['backends']} | "
                f"{r['step_s'] * 1e3:.1f} | {r['experts_s'] * 1e3:.1f} | {r['round_s']:.2f} | {r['speedup']:.1f}x | "
                f"{r['train_img_s']:.1f} | {r['eval_img_s']:.1f} | {_fmt(r.get('step_peak_mib'), '.0f')} | "
                f"{_fmt(acc, '.2f')} | {_fmt(r.get('prompt_max_abs_diff_vs_reference'), '.1e')} |"
            )
        extra = [r for r in results["round"] if r["variant"] != "reference-style"]
        if extra:
            lines.append("")
            lines += _table_head(
                "| model | C | pipeline | feature cache, once (s) | speed-up incl. cache | ours run end to end (s) "
                "/ composed from medians | eval img/s incl. image encoder | max abs Δlogit ref-style vs ours |"
            )
            for r in extra:
                measured = f"{_fmt(r.get('round_measured_s'))} / {_fmt(r.get('round_composed_for_measured_s'))}"
                lines.append(
                    f"| {r['model']} | {r['classes']} | {r['variant']} | {r['feature_cache_once_s']:.2f} | "
                    f"{r['speedup_incl_feature_cache']:.1f}x | {measured} ({_fmt(r.get('round_measured_epochs'))} "
                    "epochs) | "
                    f"{r['eval_img_s_incl_image_encoder']:.1f} | "
                    f"{r['logit_max_abs_diff_refstyle_vs_ours']:.1e} (max abs logit {r['logit_max_abs']:.1f}) |"
                )
        reasons = next((r["fused_unavailable"] for r in results["round"] if r.get("fused_unavailable")), None)
        if reasons:
            lines.append("")
            lines.append(
                "Fused backends that cannot run here: " + "; ".join(f"{b}: {why}" for b, why in reasons.items())
            )
        parts.append("\n".join(lines))
    if results.get("gate"):
        lines = _header(
            "### Gate + score op alone (forward + backward = train; forward = eval)",
            "| B | C | E | mode | variant | time (ms) | speed-up vs ref-style | peak MiB | max abs Δ |",
        )
        for r in results["gate"]:
            lines.append(
                f"| {r['batch']} | {r['classes']} | {r['experts']} | {r['mode']} | {r['variant']} | "
                f"{r['seconds'] * 1e3:.2f} | {r['speedup_vs_refstyle']:.2f}x | {_fmt(r['peak_mib'], '.0f')} | "
                f"{_fmt(r.get('max_abs_diff_vs_refstyle'), '.1e')} |"
            )
        parts.append("\n".join(lines))
    if results.get("knn"):
        lines = _header(
            "### KNN expert selection (prompts of 8,192 values, k = 9, one round's queries)",
            "| pool | queries | variant | time (s) | speed-up vs loop | vs cdist+topk | matches loop |",
        )
        for r in results["knn"]:
            note = f" (measured on {r['measured_queries']}, scaled)" if r["variant"] == "loop" else ""
            lines.append(
                f"| {r['pool']:,} | {r['queries']:,} | {r['variant']}{note} | {r['seconds']:.4f} | "
                f"{r['speedup_vs_loop']:.1f}x | {r['vs_cdist_topk']:.2f}x | {_fmt(r.get('matches_loop'))} |"
            )
        timed = {(r["pool"], r["variant"]) for r in results["knn"]}
        skipped = sorted({r["pool"] for r in results["knn"] if (r["pool"], "ops.knn[reference]") not in timed})
        if skipped:
            lines.append("")
            lines.append(
                f"ops.knn[reference] (exact float64 distances) is not timed at pools of {', '.join(map(str, skipped))},"
                " where a faster backend exists. The loop runs on a few queries and scaled (queries are independent)."
            )
        parts.append("\n".join(lines))
    if results.get("bytes"):
        lines = _header(
            "### Bytes per client and round",
            "| method | K | dtype | prompts down | bytes down | bytes up | paper down / up | matches |",
        )
        for r in results["bytes"]:
            lines.append(
                f"| {r['method']} | {r['experts']} | {r['dtype']} | {r['prompts_down']} | "
                f"{r['bytes_down']:,} ({comm.format_bytes(r['bytes_down'])}) | {r['bytes_up']:,} | "
                f"{r['paper_bytes_down']:,} / {r['paper_bytes_up']:,} | {r['matches_paper']} |"
            )
        parts.append("\n".join(lines))
    if results.get("efficiency"):
        lines = _header(
            "### Text-encoder training step efficiency (shared prefix, forward + backward, fp32)",
            "| model | C | useful / executed tokens | useful GFLOP | step (ms) | useful GFLOP/s | GEMM (shape) GFLOP/s "
            "| large GEMM GFLOP/s | efficiency |",
        )
        for r in results["efficiency"]:
            lines.append(
                f"| {r['model']} | {r['classes']} | {r['useful_tokens']:,} / {r['executed_tokens']:,} | "
                f"{r['useful_gflop']:.2f} | {r['text_step_s'] * 1e3:.1f} | {r['useful_gflops']:.1f} | "
                f"{r['gemm_comparable_gflops']:.1f} ({r['gemm_shape']}) | {r['gemm_large_gflops']:.1f} | "
                f"{r['efficiency']:.0%} |"
            )
        parts.append("\n".join(lines))
    if results.get("text-encoder"):
        lines = _header(
            "### Text encoder: one training step per prompt encoder",
            "| model | C | text encoder | tokens / prompt | token positions | step (ms) | vs truncated |",
        )
        for r in results["text-encoder"]:
            speed = f"{r['speedup_vs_truncated']:.2f}x" if "speedup_vs_truncated" in r else "n/a"
            lines.append(
                f"| {r['model']} | {r['classes']} | {r['mode']} | {r['tokens_per_prompt']} | "
                f"{r['token_positions']:,} | {r['step_seconds'] * 1000:.1f} | {speed} |"
            )
        parts.append("\n".join(lines))
    if results.get("parallel"):
        r0 = results["parallel"][0]
        lines = _header(
            f"### One round's local training, {r0['clients']} clients, K = {r0['experts']}, {r0['epochs']} local "
            "epoch(s): sequential vs lock step (--parallel-clients)",
            "| model | C | steps / client | training | ops dispatched | fewer ops | round (s) | speed-up "
            "| vs reference pattern | max abs Δ prompt |",
        )
        refs = {
            (r["model"], r["classes"]): r
            for r in results.get("round", [])
            if r["variant"] == "reference-style" and r.get("steps")
        }
        for r in results["parallel"]:
            ref = refs.get((r["model"], r["classes"]))
            vs_ref = "n/a (run `round` too)"
            if ref is not None:  # the reference pattern's client round, scaled to these steps and clients
                ref_round = ref["round_s"] * r["steps_per_client"] / ref["steps"] * r["clients"]
                vs_ref = f"{ref_round / r['seconds']:.1f}x"
            lines.append(
                f"| {r['model']} | {r['classes']} | {r['steps_per_client']} | {r['variant']} | {r['ops']:,} | "
                f"{r['ops_ratio']:.1f}x | {r['seconds']:.2f} | {r['speedup']:.2f}x | {vs_ref} | "
                f"{r['prompt_max_abs_diff']:.1e} |"
            )
        parts.append("\n".join(lines))
    if target_rows:
        lines = _header("### Targets", "| target | measured | met |")
        for t in target_rows:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="profiling/bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    sections_help = f"any of {', '.join(SECTIONS)} (default: all but text-encoder)"
    p.add_argument("sections", nargs="*", metavar="SECTION", help=sections_help)
    p.add_argument("--size", choices=sorted(SIZES), help="smoke (seconds), cpu (minutes), full (GPU); default: device")
    p.add_argument("--smoke", action="store_true", help="same as --size smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--models", "--model", type=_csv, help="open_clip architectures (random weights)")
    p.add_argument("--classes", type=_csv_ints, help="class counts C for round / text-encoder")
    p.add_argument("--repeats", type=int, help="interleaved repeats per variant (median taken)")
    p.add_argument("--no-accuracy-round", action="store_true", help="skip the end-to-end rounds of ours")
    p.add_argument("--gate-grid", help="B list;C list;E list, e.g. '16,256;10,1000;2,10,40'")
    p.add_argument("--knn-pools", type=_csv_ints, help="pool sizes, e.g. 100,1000,10000")
    p.add_argument("--knn-frac", type=float, help="queries per round as a fraction of the pool (default 0.1)")
    p.add_argument("--eff-classes", type=_csv_ints, help="class counts for the efficiency section")
    p.add_argument("--modes", type=_csv, help="text-encoder modes (full,truncated,shared-prefix)")
    p.add_argument("--full-max-classes", type=int, default=102, help="text-encoder: skip 77 tokens above this C")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for nsys)")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--markdown", help="write the markdown tables here")
    return p


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    name = "smoke" if args.smoke else (args.size or ("full" if args.device == "cuda" else "cpu"))
    s = replace(SIZES[name])
    if args.models:
        s.models = args.models
    if args.classes:
        s.classes = s.text_classes = args.classes
    if args.repeats:
        s.repeats = s.gate_repeats = s.knn_repeats = args.repeats
    if args.no_accuracy_round:
        s.accuracy_round = False
    if args.gate_grid:
        bs, cs, es = (_csv_ints(x) for x in args.gate_grid.split(";"))
        s.gate_shapes = _grid(bs, cs, es)
    if args.knn_pools:
        s.knn_pools = args.knn_pools
    if args.knn_frac:
        s.knn_frac = args.knn_frac
    if args.eff_classes:
        s.eff_classes = args.eff_classes
    if args.modes:
        s.text_modes = args.modes
    args.size_name = name
    return s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        valid = ", ".join(SECTIONS)
        print(f"profiling/bench.py: error: unknown section {unknown[0]!r} (valid: {valid})", file=sys.stderr)
        return 2
    sections = args.sections or list(DEFAULT_SECTIONS)
    sizes = resolve_sizes(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nvtx:
        prof.enable()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | {args.device} ({device_name}) "
        f"| {torch.get_num_threads()} threads | {os.cpu_count()} cores | load {load:.2f} at start | size "
        f"{args.size_name} | `python profiling/bench.py {' '.join(argv)}`"
    )
    print(header, file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    if "bytes" in sections:
        results["bytes"] = bench_bytes(sizes, args)
    if "knn" in sections:
        results["knn"] = bench_knn(sizes, args)
    if "gate" in sections:
        results["gate"] = bench_gate(sizes, args)
    model_sections = [s for s in ("round", "efficiency", "text-encoder", "parallel") if s in sections]
    if model_sections:
        for model in sizes.models:
            clip = load_clip(model, "none", device, progress=False)
            for s in model_sections:
                fn = {
                    "round": bench_round,
                    "efficiency": bench_efficiency,
                    "text-encoder": bench_text_encoder,
                    "parallel": bench_parallel,
                }[s]
                results.setdefault(s, []).extend(fn(sizes, args, clip))
            del clip
    target_rows = targets(results, device)
    table = markdown(results, target_rows)
    print(header)
    print()
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\n(bench took {elapsed:.0f} s)", file=sys.stderr)
    if args.json:
        payload = {
            "header": header,
            "meta": {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": args.device,
                "device_name": device_name,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "load_at_start": load,
                "size": args.size_name,
                "sizes": asdict(sizes),
                "command": f"python profiling/bench.py {' '.join(argv)}",
                "seconds": elapsed,
                "backends_available": ops.available_backends(),
                "backends_unavailable": ops.unavailable_backends(),
            },
            "sections": results,
            "targets": target_rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
