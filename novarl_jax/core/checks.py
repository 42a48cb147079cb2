"""Argument checks shared by the library: integers and real numbers, NumPy's included.

Imports no JAX at module level (the command line validates before JAX starts); a value that
might be a JAX array is inspected only when it is one.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["check_int", "check_random_key", "is_integer", "real_value"]


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``int(value)`` for an integer >= ``minimum`` (NumPy integers, and 0-d integer arrays
    such as a train state's ``policy_version``, too).

    Raises:
        ValueError: ``"{name} must be an integer >= {minimum}, got {value!r}"``.
    """
    if (
        not isinstance(value, np.generic)  # NumPy scalars are checked as they are
        and getattr(value, "shape", None) == ()
        and isinstance(getattr(value, "dtype", None), np.dtype)  # not a PRNG key's dtype
        and np.issubdtype(value.dtype, np.integer)
    ):
        try:
            value = int(value)
        except Exception:  # noqa: BLE001 - traced under jit: not a concrete integer
            pass
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def real_value(value: Any) -> float | None:
    """``float(value)`` for a concrete real number, else None.

    Real numbers are Python and NumPy integers and floats and 0-d NumPy or JAX arrays of an
    integer or floating dtype that are not traced under ``jit``; bools, strings, complex
    numbers and tracers are not.
    """
    if isinstance(value, bool | np.bool_ | str):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    import jax
    import jax.numpy as jnp

    if isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
        return None
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        return None
    return float(value)


def check_random_key(key: Any, name: str = "key") -> None:
    """Raises ValueError unless ``key`` is a typed ``jax.random`` key or raw uint32 key data
    (``jax.random.PRNGKey``'s). An int seed, the commonest mistake, is named as one."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and not isinstance(dtype, np.dtype):  # a key's dtype is JAX's own
        import jax

        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return
    if dtype == np.uint32 and np.ndim(key) >= 1:
        return
    got = f"{type(key).__name__} of dtype {dtype}" if dtype is not None else repr(key)[:40]
    raise ValueError(
        f"{name} must be a jax.random key (jax.random.key(seed), or raw uint32 key data), got {got}"
    )
