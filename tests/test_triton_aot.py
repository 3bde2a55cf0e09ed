"""The Triton kernels compile ahead of time for sm_80 and sm_90 (PTX and cubin) with no GPU, in every variant of
the covering set, within each target's shared memory, and the embedded benchmark's shapes without register spills
(kernels/README.md has every kernel's registers and spills)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from pfedmoap.ops import triton_aot  # noqa: E402


def test_covering_set_spans_every_axis():
    full, cover = triton_aot.variants(), triton_aot.covering_variants()
    assert set(cover) <= set(full)
    for axis in ("kernel", "target", "dtype", "block_b", "d_pad", "h_pad", "num_warps", "has_local", "need_weights"):
        assert {getattr(v, axis) for v in cover} == {getattr(v, axis) for v in full}, axis
    shapes = {(v.block_b, v.d_pad, v.h_pad, v.num_warps) for v in full}
    assert shapes == {(v.block_b, v.d_pad, v.h_pad, v.num_warps) for v in cover}  # every tile shape compiled
    assert (16, 1024, 32, 32) in shapes and (64, 32, 16, 4) in shapes


def test_refuses_to_compile_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        triton_aot.compile_all(triton_aot.covering_variants()[:1])


def test_every_covering_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "pfedmoap.ops.triton_aot", "--covering", "--workers", "2", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    results = json.loads(out.read_text()) if out.is_file() else []
    failed = [f"{r['variant']['kernel']} {r['variant']}: {r['error']}" for r in results if not r["ok"]]
    assert done.returncode == 0 and not failed, (failed[:3], done.stderr[-2000:])
    assert len(results) == len(triton_aot.covering_variants())
    assert {r["variant"]["target"] for r in results} == {"sm_80", "sm_90"}
    for r in results:
        v = r["variant"]
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0
        assert r["registers"] <= 255
        # compiling is not enough: a block that needs more shared memory than an SM has fails at launch
        assert r["shared"] <= triton_aot.MAX_SHARED[v["target"]], v
        # the embedded benchmark's gate (d = 32, 8 heads): training tiles (16 rows) and the forward's eval tile
        # (64 rows) run without spilling (kernels/README.md has the rest, and where they spill)
        if v["d_pad"] == 32 and v["h_pad"] == 16 and (v["block_b"] == 16 or v["kernel"] == "gate_score_fwd_kernel"):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, v
