"""The vendored hybrid model (Mamba-2 + Superlinear attention + MoE) in plain PyTorch."""
