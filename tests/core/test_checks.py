"""The shared argument checks: integers and real numbers, NumPy's and concrete JAX ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novarl_jax.core.checks import check_int, is_integer, real_value


def test_integers():
    assert is_integer(3) and is_integer(np.int64(3)) and is_integer(np.uint8(0))
    for value in (True, np.bool_(False), 3.0, "3", np.array(3)):
        assert not is_integer(value), value
    assert check_int("n", np.int32(4), 1) == 4 and type(check_int("n", np.int32(4), 1)) is int
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got 0$"):
        check_int("n", 0, 1)
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0, got True$"):
        check_int("n", True, 0)


def test_real_values():
    for value, want in ((2, 2.0), (0.5, 0.5), (np.float32(0.25), 0.25), (jnp.float32(1.5), 1.5),
                        (jnp.bfloat16(1.5), 1.5), (np.array(7), 7.0)):  # fmt: skip
        assert real_value(value) == want, value
    for value in (True, np.bool_(True), "1", 1 + 2j, np.complex64(1), np.ones(2), None,
                  jnp.array(True)):  # fmt: skip
        assert real_value(value) is None, value
    seen = []
    jax.jit(lambda x: seen.append(real_value(x)) or x)(1.0)
    assert seen == [None]  # traced: not concrete
