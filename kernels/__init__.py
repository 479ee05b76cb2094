"""Superlinear attention: pure-PyTorch reference and Triton kernels behind one dispatch."""
