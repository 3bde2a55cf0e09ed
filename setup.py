"""Build script for the compiled parts; the package metadata lives in pyproject.toml.

It builds the extension ``pfedmoap._C`` from ``csrc/`` (see csrc/README.md) and installs the top-level
``kernels/`` directory (the Triton kernels) as the package ``pfedmoap.kernels``.

The extension is a CppExtension (CPU, OpenMP) against a torch without CUDA, and a CUDAExtension (CPU and CUDA
kernels) when torch has CUDA and nvcc is found. Environment:

- ``PFEDMOAP_CUDA=0``: CPU-only build, whatever is installed. ``PFEDMOAP_CUDA=1``: the CUDA build is required,
  and a missing nvcc or a torch without CUDA is an error instead of a fallback (CI uses this, so that a broken
  ``.cu`` file fails the build). Unset: CUDA when possible, else CPU-only, with a note saying why.
- ``CUDA_HOME``: the CUDA toolkit. Unset: the toolkit of the ``nvcc`` on PATH (nvcc may be a wrapper script,
  so nvcc itself is asked where it lives).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for. Unset: those of the visible GPUs, or
  ``DEFAULT_ARCHS`` on a machine without one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NoReturn

from setuptools import setup
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
# Turing, Ampere, Hopper native; newer GPUs JIT-compile the Hopper PTX. Used only when no GPU is visible.
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"
# Headers that torch's CUDA headers include; a bare toolkit may lack some that pip's nvidia-* packages provide.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h", "curand.h")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"error: building pfedmoap._C: {message}")


try:
    import torch
except ImportError:
    fail(
        "torch is not importable. Build with pip's default build isolation (pip install .), or install torch "
        "first and then run pip install --no-build-isolation ."
    )


def toolkit_of_nvcc() -> Path | None:
    """The CUDA toolkit behind the nvcc on PATH, following wrapper scripts (nvcc reports its own directory)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        probe = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return Path(line.split("=", 1)[1].strip()).resolve().parent
    return Path(nvcc).resolve().parent.parent


def find_cuda_home() -> tuple[Path | None, str]:
    """(toolkit, why not): CUDA_HOME / CUDA_PATH if set, else the toolkit of the nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = Path(os.environ[var])
            if (home / "bin" / "nvcc").exists():
                return home, ""
            return None, f"{var}={home} has no bin/nvcc"
    home = toolkit_of_nvcc()
    if home is None:
        return None, "nvcc was not found (put it on PATH or set CUDA_HOME)"
    if not (home / "bin" / "nvcc").exists():
        return None, f"the nvcc on PATH does not sit in a toolkit directory (resolved to {home}); set CUDA_HOME"
    return home, ""


def pip_cuda_include_dirs(home: Path) -> list[str]:
    """Include directories of torch's pip CUDA packages (nvidia-*) for the headers the toolkit lacks."""
    toolkit_dirs = [home / "include", *sorted((home / "targets").glob("*/include"))]
    missing = [h for h in CUDA_LIBRARY_HEADERS if not any((d / h).exists() for d in toolkit_dirs)]
    if not missing:
        return []
    roots = [Path(torch.__file__).resolve().parent.parent / "nvidia"]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    found: list[str] = []
    for root in dict.fromkeys(roots):
        for include in sorted(root.glob("*/include")):
            if any((include / h).exists() for h in missing) and str(include) not in found:
                found.append(str(include))
    return found


def cuda_plan() -> tuple[bool, str, list[str]]:
    """(build CUDA?, why not, extra include dirs), following PFEDMOAP_CUDA."""
    mode = os.environ.get("PFEDMOAP_CUDA", "").strip().lower()
    if mode not in ("", "0", "1", "auto"):
        fail(f"PFEDMOAP_CUDA={mode!r}: use 0 (CPU only), 1 (CUDA required) or leave it unset")
    if mode == "0":
        return False, "PFEDMOAP_CUDA=0", []
    reason = ""
    home = None
    if getattr(torch.version, "hip", None):
        reason = f"torch {torch.__version__} is a ROCm build (only CUDA kernels are written)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    else:
        home, reason = find_cuda_home()
    if reason:
        if mode == "1":
            fail(f"PFEDMOAP_CUDA=1 asks for the CUDA build, but {reason}")
        print(f"note: building pfedmoap._C for the CPU only: {reason}", file=sys.stderr)
        return False, reason, []
    assert home is not None
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, below
    os.environ["CUDA_HOME"] = str(home)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS  # torch's default needs a visible GPU
    return True, "", pip_cuda_include_dirs(home)


def missing_compiler() -> str:
    """What is missing to compile and link C++ here ('' when nothing is)."""
    # torch compiles with $CXX (default c++); setuptools links C++ extensions with $CXX or Python's configured one
    compile_cxx = shlex.split(os.environ.get("CXX") or "c++")
    link_cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    for tool in dict.fromkeys([compile_cxx[0] if compile_cxx else "", link_cxx[0] if link_cxx else ""]):
        if not tool or shutil.which(tool) is None:
            return (
                f"no C++ compiler was found ({tool or '(empty)'!r} is not on PATH). pfedmoap._C needs a C++17 "
                "compiler such as g++ or clang++: install one (e.g. apt-get install g++) or set CXX to one"
            )
    return ""


USE_CUDA, _, CUDA_INCLUDES = cuda_plan()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# written beside the built library: the torch it was built against, so that a failed import can say so
BUILD_RECORD = "_C.build.json"


class BuildExt(BuildExtension):
    """torch's BuildExtension, failing first with one clear line when no compiler is installed.

    After building it records the torch version beside the library and, in a source checkout, also places the
    library in the checkout's ``pfedmoap/`` (as an editable install does): ``python -m pfedmoap.train`` run from
    the checkout root imports the source tree, which would otherwise shadow the installed extension.
    """

    def run(self) -> None:
        problem = missing_compiler()
        if problem:
            fail(problem)
        super().run()
        record = json.dumps(
            {"torch": torch.__version__, "cuda": torch.version.cuda if USE_CUDA else None, "python": sys.version}
        )
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            (built.parent / BUILD_RECORD).write_text(record + "\n")
            source_pkg = ROOT / "pfedmoap"
            if self.inplace or not (source_pkg / "__init__.py").is_file() or built.parent.resolve() == source_pkg:
                continue
            try:
                shutil.copy2(built, source_pkg / built.name)
                shutil.copy2(built.parent / BUILD_RECORD, source_pkg / BUILD_RECORD)
            except OSError as exc:  # a read-only checkout: the installed package still has the library
                print(f"note: could not place {built.name} in {source_pkg} ({exc.strerror})", file=sys.stderr)


def extension():
    sources = ["csrc/bindings.cpp", "csrc/assemble.cpp", "csrc/knn.cpp", "csrc/host_kernels.cpp"]
    cuda_sources = ["csrc/cuda/assemble.cu", "csrc/cuda/knn.cu"]
    # every csrc file is a dependency, so that an sdist made by a CPU-only build still carries the CUDA sources
    depends = ["csrc/pfedmoap.h", "csrc/kernel_logic.h", *cuda_sources]
    cxx = ["-O3", "-g0"]  # no debug info: a 14 MB library becomes a few MB
    link: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for expands to OpenMP pragmas in our own code; libgomp is the one torch already loaded
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not USE_CUDA:
        return CppExtension(
            "pfedmoap._C", sources, depends=depends, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    # after the toolkit's own include directory: only headers it lacks come from the pip packages
    system = [flag for d in CUDA_INCLUDES for flag in ("-isystem", d)]
    flags = ["-DPFEDMOAP_WITH_CUDA"]
    return CUDAExtension(
        "pfedmoap._C",
        sources + cuda_sources,
        depends=depends,
        extra_compile_args={"cxx": cxx + flags + system, "nvcc": ["-O3", *flags, *system]},
        extra_link_args=link,
    )


class PfedmoapDistribution(Distribution):
    """Adds ``kernels/`` as the package ``pfedmoap.kernels``.

    pyproject.toml's [tool.setuptools.packages.find] (applied after setup()'s arguments, which it replaces) only
    sees the packages under pfedmoap/; the Triton kernels live in the top-level kernels/ folder.
    """

    def parse_config_files(self, *args, **kwargs) -> None:
        super().parse_config_files(*args, **kwargs)
        packages = list(self.packages or [])
        self.packages = packages if "pfedmoap.kernels" in packages else [*packages, "pfedmoap.kernels"]
        self.package_dir = {**(self.package_dir or {}), "pfedmoap.kernels": "kernels"}


setup(
    distclass=PfedmoapDistribution,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
)
