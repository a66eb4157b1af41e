"""Triton kernels and their plain-torch references, importable as ``fastdream.kernels``."""
