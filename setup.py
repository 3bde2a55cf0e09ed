"""Build script. Metadata lives in pyproject.toml; this file exists for the compiled parts.

The C++/CUDA extension ``pfedmoap._C`` and the Triton kernels (``kernels/``) are added by the fused-backend
work; until then the package is pure Python and every op runs its plain-torch reference.
"""

from setuptools import setup

setup()
