"""Triton kernels of pfedmoap (installed as ``pfedmoap.kernels``); see gate.py."""
