"""Versions as the train state holds them: 0-d integer arrays are versions everywhere."""

import jax
import jax.numpy as jnp
import pytest

from novarl_jax.sync import ParamStore, VersionedParams, WeightSyncController, staleness


def test_a_train_states_policy_version_is_a_version_everywhere():
    version = jnp.asarray(8, jnp.int32)  # TrainState.policy_version
    assert VersionedParams(version, {}).version == 8
    store = ParamStore()
    assert store.publish(version, {"w": 1}).version == 8
    controller = WeightSyncController(interval=4, max_staleness=6)
    published = []
    reason = controller.maybe_broadcast(version, [jnp.asarray(0)], published.append)
    assert reason is not None and published == [version]
    assert staleness(version, [jnp.asarray(7)]).tolist() == [1]
    with pytest.raises(ValueError, match=r"version must be an integer >= 0, got -1"):
        VersionedParams(jnp.asarray(-1), {})
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        VersionedParams(jnp.asarray(1.0), {})  # a float array is no version


def test_a_traced_version_is_refused_with_the_usual_message():
    def publish(v):
        VersionedParams(v, {})
        return v

    with pytest.raises(ValueError, match="must be an integer >= 0"):
        jax.jit(publish)(jnp.asarray(1))


def test_a_prng_key_is_no_version():
    from novarl_jax.core.checks import check_int

    with pytest.raises(ValueError, match="must be an integer >= 0"):
        check_int("version", jax.random.key(0), 0)
