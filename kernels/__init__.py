"""Fused decoding kernels in Triton, each beside a pure-torch reference."""
