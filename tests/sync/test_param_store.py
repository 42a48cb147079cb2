"""ParamStore: publish/acquire/release, pruning to what workers still hold, thread safety."""

import dataclasses
import threading

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from novarl_jax.sync import ParamStore, VersionedParams


def test_versioned_params_is_immutable_and_validated():
    entry = VersionedParams(np.int32(3), {"w": 1})
    assert entry.version == 3 and type(entry.version) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.version = 4
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="version must be an integer >= 0"):
            VersionedParams(bad, {})


def test_publish_latest_get():
    store = ParamStore()
    assert store.latest() is None
    with pytest.raises(LookupError, match="nothing has been published yet"):
        store.acquire("w0")
    first = store.publish(0, {"w": 0})
    assert store.latest() is first and store.get(0).params == {"w": 0}
    store.publish(2, {"w": 2})
    assert store.latest().version == 2
    # Version 0 was the latest and nobody held it: dropped.
    assert store.kept_versions() == (2,)
    with pytest.raises(KeyError, match=r"version 0 is not kept; kept versions: \[2\]"):
        store.get(0)
    for bad in (2, 1):
        with pytest.raises(ValueError, match=f"version must increase: got {bad} after 2"):
            store.publish(bad, {})
    assert store.latest().version == 2


def test_keeps_what_workers_hold():
    store = ParamStore()
    store.publish(0, "p0")
    assert store.acquire("a").params == "p0"
    store.publish(1, "p1")
    assert store.acquire("b").version == 1
    store.publish(2, "p2")
    assert store.worker_versions() == {"a": 0, "b": 1}
    assert store.kept_versions() == (0, 1, 2)
    assert store.get(0).params == "p0"
    store.acquire("a")  # moves to 2: version 0 is no longer needed
    assert store.kept_versions() == (1, 2)
    store.release("b")
    store.release("unknown")
    assert store.kept_versions() == (2,)
    assert store.worker_versions() == {"a": 2}
    # A snapshot: later changes do not show in it, nor changes to it in the store.
    snapshot = store.worker_versions()
    store.release("a")
    assert snapshot == {"a": 2}
    snapshot["b"] = 7
    assert store.worker_versions() == {}


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 3)),
        st.tuples(st.just("acquire"), st.integers(0, 2)),
        st.tuples(st.just("release"), st.integers(0, 2)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(_OPS)
def test_kept_is_latest_plus_held(ops):
    """Model check: kept == {latest} | held, and every held version is retrievable."""
    store = ParamStore()
    store.publish(0, 0)
    latest, held = 0, {}
    for op, arg in ops:
        if op == "publish":
            latest += arg
            store.publish(latest, latest)
        elif op == "acquire":
            assert store.acquire(arg).version == latest
            held[arg] = latest
        else:
            store.release(arg)
            held.pop(arg, None)
        assert store.kept_versions() == tuple(sorted({latest, *held.values()}))
        assert store.worker_versions() == held
        for version in held.values():
            assert store.get(version).params == version


def test_thread_safety_under_concurrent_publish_and_acquire():
    store = ParamStore()
    store.publish(0, np.zeros(4))
    last = 300
    errors, seen = [], {w: [] for w in range(4)}

    def publisher():
        for v in range(1, last + 1):
            store.publish(v, np.full(4, v))

    def worker(w):
        try:
            while True:
                entry = store.acquire(w)
                # The held version is kept and its parameters are its own.
                assert store.get(entry.version) is entry
                np.testing.assert_array_equal(entry.params, entry.version)
                seen[w].append(entry.version)
                if entry.version == last:
                    break
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            store.release(w)

    threads = [threading.Thread(target=publisher)]
    threads += [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for versions in seen.values():
        assert versions == sorted(versions) and versions[-1] == last
    assert store.worker_versions() == {}
    assert store.kept_versions() == (last,)
