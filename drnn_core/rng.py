"""SplitMix64 random numbers for Numba kernels, with the state passed in as an array.

A kernel that draws numbers takes ``rng_state`` (uint64 array of shape (1,)) and
advances it in place, so a run is reproducible from its seed and the state can be
checkpointed with the model.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0

_STATE = types.Array(types.uint64, 1, "C")


def new_rng_state(seed: int) -> np.ndarray:
    """Create an RNG state from a seed.

    Returns
    -------
    ndarray, shape (1,), uint64
    """
    return np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)


@njit(types.uint64(_STATE), nogil=True, cache=True)
def next_u64(rng_state):
    """Advance the state and return 64 random bits (SplitMix64, Steele et al. 2014)."""
    rng_state[0] += _GOLDEN
    z = rng_state[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(types.uint64(types.int64, types.int64), nogil=True, cache=True)
def mix64(a, b):
    """Return 64 well-mixed bits of the pair (a, b): the SplitMix64 finaliser of ``a * golden + b``."""
    z = np.uint64(a) * _GOLDEN + np.uint64(b)
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(types.float64(_STATE), nogil=True, cache=True)
def next_float(rng_state):
    """Return a uniform float64 in [0, 1) with 53 random bits."""
    return float(next_u64(rng_state) >> np.uint64(11)) * _INV_2_53


@njit(types.int64(_STATE, types.int64), nogil=True, cache=True)
def next_below(rng_state, n):
    """Return a uniform integer in [0, n) for n >= 1 (bias below 2**-53 * n)."""
    k = np.int64(next_float(rng_state) * n)
    if k >= n:
        k = n - 1
    return k
