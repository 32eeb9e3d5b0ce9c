"""Draws built only on rng.random(): numpy documents that the higher-level
Generator methods (normal, integers, choice) may change their streams between
versions, while the raw uniform doubles stay fixed."""
import math


def uniform(rng, lo, hi):
    return lo + (hi - lo) * float(rng.random())


def integer(rng, lo, hi):
    """Uniform integer in [lo, hi] (both inclusive)."""
    return min(hi, lo + int(float(rng.random()) * (hi - lo + 1)))


def normal(rng, sigma):
    """Box-Muller with Python's scalar libm (not numpy's SIMD loops)."""
    u1, u2 = float(rng.random()), float(rng.random())
    return sigma * math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def chance(rng, p):
    return float(rng.random()) < p
