"""Triton kernels with pure-torch references, installed as ``vladva_openclip.kernels``."""
