"""setup.py's one-line errors: a bad PFEDMOAP_CUDA value, and a build without a C++ compiler.

Both fail before anything is compiled, in a copy of the sources, so nothing in the checkout is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("setuptools", reason="setup.py needs setuptools in this environment")

ROOT = Path(__file__).resolve().parents[1]


def run_setup(tmp_path: Path, env_updates: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    env = {**os.environ, **env_updates}
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_bad_cuda_switch_is_one_line(tmp_path):
    result = run_setup(tmp_path, {"PFEDMOAP_CUDA": "2"}, "--name")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: building pfedmoap._C: PFEDMOAP_CUDA='2': use 0 (CPU only), 1 (CUDA required) or leave it unset"
    )
    assert "Traceback" not in result.stderr


def test_build_without_a_compiler_says_what_is_missing(tmp_path):
    result = run_setup(tmp_path, {"PFEDMOAP_CUDA": "0", "CXX": "no-such-compiler-xyz"}, "build_ext", "--inplace")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: building pfedmoap._C: no C++ compiler was found ('no-such-compiler-xyz'")
    assert "apt-get install g++" in last
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/*.so"))


# ---------------------------------------------------------------------------------------------- why _C is missing
def _fake_library(folder: Path) -> Path:
    import importlib.machinery

    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    lib.write_bytes(b"not a library")
    return lib


def test_missing_extension_names_a_shadowing_source_tree(tmp_path, monkeypatch):
    """pip install . put _C into site-packages, but python -m from the checkout imports the checkout: say so."""
    from pfedmoap.ops import cpp

    checkout = tmp_path / "checkout" / "pfedmoap"
    checkout.mkdir(parents=True)
    installed = tmp_path / "site-packages"
    _fake_library(installed / "pfedmoap")
    monkeypatch.setattr(cpp, "_package_dir", lambda: checkout)
    monkeypatch.setattr("sys.path", [str(tmp_path / "checkout"), str(installed)])
    reason = cpp._missing_reason()
    assert f"built in {installed / 'pfedmoap'}" in reason and f"source tree at {checkout}, which shadows it" in reason
    monkeypatch.setattr("sys.path", [str(tmp_path / "checkout")])
    assert cpp._missing_reason().startswith(f"pfedmoap._C is not built (no library in {checkout})")


def test_extension_built_for_another_torch_says_which(tmp_path, monkeypatch):
    import json

    import torch

    from pfedmoap.ops import cpp

    package = tmp_path / "pfedmoap"
    lib = _fake_library(package)
    monkeypatch.setattr(cpp, "_package_dir", lambda: package)
    error = ImportError("undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
    assert "is built but cannot be imported (undefined symbol" in cpp._import_failure_reason(error)
    (package / cpp.BUILD_RECORD).write_text(json.dumps({"torch": "1.0.0"}))
    reason = cpp._import_failure_reason(error)
    assert reason.startswith(f"{lib} was built for torch 1.0.0, this is torch {torch.__version__}: rebuild")


def test_extension_that_imports_under_another_torch_is_flagged(tmp_path, monkeypatch):
    import json

    import torch

    from pfedmoap.ops import cpp

    monkeypatch.setattr(cpp, "_package_dir", lambda: tmp_path)
    monkeypatch.setattr(cpp, "_load", lambda: object())  # as if the library had imported
    assert cpp.build_warning() == ""  # no record: nothing to compare
    (tmp_path / cpp.BUILD_RECORD).write_text(json.dumps({"torch": torch.__version__}))
    assert cpp.build_warning() == ""
    (tmp_path / cpp.BUILD_RECORD).write_text(json.dumps({"torch": "9.9.9"}))
    note = cpp.build_warning()
    assert note.startswith(f"pfedmoap._C was built against torch 9.9.9 and runs under torch {torch.__version__}")
