"""Omniglot-like synthetic glyphs: stroke model, rasterizer and 1-bit PNG writer.

Everything here is deterministic bit for bit: random numbers come only from
numpy's PCG64 raw uniforms (rng.random), geometry uses elementwise float64
arithmetic (no BLAS, whose summation order may vary), and the PNG encoder is
our own, so the committed sample can be regenerated identically.
"""
