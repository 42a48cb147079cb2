"""Checkpointer edges: its settings, the trash emptied on opening, restoring from nothing,
mismatch messages, typed PRNG keys, saves from another thread, and error causes."""

import errno
import json
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novarl_jax.trainer.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointUnreadableError,
    _cause,
    _one_line,
    abstract_like,
    first_non_finite,
    state_checksums,
)

SDS = jax.ShapeDtypeStruct


def test_bool_keep_and_interval_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep must be an integer >= 1, got True"):
        Checkpointer(str(tmp_path), keep=True)


def test_interval_none_is_refused(tmp_path):
    with pytest.raises(ValueError, match="interval must be an integer >= 1, got None"):
        Checkpointer(str(tmp_path), interval=None)


def test_opening_empties_the_trash(tmp_path):
    (tmp_path / "todelete" / "7").mkdir(parents=True)
    (tmp_path / "todelete" / "7" / "f").write_text("x")
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert os.listdir(tmp_path / "todelete") == []
    ckpt.close()


def test_restoring_from_an_empty_directory_names_it(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore({"w": SDS((2,), jnp.float32)})
    ckpt.close()


def test_exactly_three_mismatches_are_listed_without_more(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    ckpt.save(1, {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}, {"iteration": 1})
    like = {k: SDS((3,), jnp.float32) for k in "abc"}
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore(like)
    assert "more)" not in str(e.value) and str(e.value).count("the checkpoint has") == 3
    ckpt.close()


def test_a_typed_prng_key_restores(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    state = {"w": jnp.ones(2), "k": jax.random.key(0)}
    ckpt.save(1, state, {"iteration": 1})
    restored, _ = ckpt.restore(abstract_like(state))
    assert (jax.random.key_data(restored["k"]) == jax.random.key_data(state["k"])).all()
    ckpt.close()


def test_an_os_error_in_the_exception_context_is_named():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("save failed")  # noqa: B904 - implicit context on purpose
    except RuntimeError as e:
        assert _cause(e) == "OSError: [Errno 28] No space left on device"


def test_one_line_is_the_first_line():
    assert _one_line(ValueError("first\nsecond")) == "ValueError: first"


def test_a_save_from_another_thread(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    out = []

    def run():
        try:
            out.append(ckpt.save(1, {"w": jnp.ones(2)}, {"iteration": 1}))
        except Exception as e:  # noqa: BLE001
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == [True] and ckpt.all_steps() == [1]
    ckpt.close()


def test_a_tensorstore_spec_dump_is_cut_from_the_cause():
    spec = "{" + '"driver": "zarr", ' * 200 + "}"
    for message in (
        f"DATA_LOSS: Error decoding manifest: Encoded length (0) is less than minimum length "
        f"(16) [tensorstore_spec='{spec}']",
        f"DATA_LOSS: Error decoding manifest: Encoded length (0) is less than minimum length "
        f"(16); <bound method PyCapsule.spec of TensorStore({spec})>",
    ):
        assert _one_line(ValueError(message)) == (
            "ValueError: DATA_LOSS: Error decoding manifest: Encoded length (0) is less than "
            "minimum length (16)"
        )
    assert _one_line(ValueError("x" * 1000)) == "ValueError: " + "x" * 300 + "..."


def _step_2_damaged(directory, cause):
    """The refusal of a damaged step 2 whose cause is a ValueError, with step 1 kept."""
    return (
        f"{directory}/2: checkpoint could not be read (ValueError: {cause}); it may be damaged: "
        f"move {directory}/2 out of {directory} to resume from step 1 (older checkpoints: [1])"
    )


def test_a_step_that_restores_non_finite_values_is_refused_as_damaged(tmp_path):
    """Bytes flipped inside a chunk can still decode: a NaN state was restored and trained
    on (every update skipped), and the run then called that step intact."""
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    ckpt.save(1, {"w": jnp.ones(3), "step": jnp.int32(1)}, {"iteration": 1})
    ckpt.save(2, {"w": jnp.array([1.0, jnp.nan, 2.0]), "step": jnp.int32(2)}, {"iteration": 2})
    like = abstract_like({"w": jnp.ones(3), "step": jnp.int32(0)})
    with pytest.raises(CheckpointUnreadableError) as info:
        ckpt.restore(like)
    assert str(info.value) == _step_2_damaged(tmp_path, "w holds NaN or infinite values")
    state, host = ckpt.restore(like, step=1)
    assert host == {"iteration": 1} and float(state["w"].sum()) == 3.0
    ckpt.close()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_first_non_finite_names_the_first_bad_leaf_among_finite_ones(bad):
    tree = {"a": jnp.ones(2), "b": jnp.array([1.0, bad]), "c": jnp.array([bad]), "n": 7}
    tree["d"] = jnp.ones(2, jnp.bfloat16)
    assert first_non_finite(tree) == "b"
    assert first_non_finite({"a": jnp.ones(2), "d": jnp.array([bad], jnp.bfloat16)}) == "d"
    assert first_non_finite({"a": jnp.ones(2), "step": jnp.int32(1)}) is None
    assert first_non_finite({"step": jnp.int32(1), "mask": jnp.ones(2, bool)}) is None


def test_state_checksums_change_with_any_word_and_not_with_the_layout(devices):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 6)).astype(np.float32)
    tree = {
        "w": jnp.asarray(w), "h": jnp.asarray(w, jnp.bfloat16), "step": jnp.int32(3),
        "mask": jnp.asarray(w > 0), "key": jax.random.key(1), "n": 7,
    }  # fmt: skip
    sums = state_checksums(tree)
    assert sorted(sums) == ["h", "key", "mask", "step", "w"]
    from novarl_jax.trainer import checkpoint

    hits = checkpoint._per_leaf_program.cache_info().hits
    assert state_checksums(tree) == sums  # the same program again, not a new one per save
    assert checkpoint._per_leaf_program.cache_info().hits == hits + 1
    for i, j in [(0, 0), (7, 5), (3, 2)]:  # one word changed by one bit
        bits = w.view(np.uint32).copy()
        bits[i, j] ^= 1 << 7
        assert state_checksums({**tree, "w": jnp.asarray(bits.view(np.float32))})["w"] != sums["w"]
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # two rows swapped: the same words, other places
    assert state_checksums({**tree, "w": jnp.asarray(swapped)})["w"] != sums["w"]
    mesh = jax.make_mesh((4, 2), ("a", "b"), devices=devices)
    from jax.sharding import NamedSharding, PartitionSpec

    sharded = jax.device_put(tree["w"], NamedSharding(mesh, PartitionSpec("a", "b")))
    assert state_checksums({"w": sharded}) == {"w": sums["w"]}
    # The same sum in NumPy: odd weights of the linear index, modulo 2**32.
    words = w.view(np.uint32).reshape(-1).astype(np.uint64)
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    assert sums["w"] == int((words * weights).sum() % 2**32)


def test_a_step_whose_arrays_differ_from_their_checksums_is_refused_as_damaged(tmp_path):
    """Bytes damaged on disk that still decode to finite numbers resumed silently (and the
    run then trained on them); the checksums saved beside the state catch them."""
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    state = {"w": jnp.arange(6.0), "step": jnp.int32(1)}
    ckpt.save(1, state, {"iteration": 1})
    ckpt.save(2, state, {"iteration": 2})
    like = abstract_like(state)
    restored, host = ckpt.restore(like)
    assert host == {"iteration": 2}  # the checksums are the checkpointer's own
    record = next((tmp_path / "2" / "host").glob("*"))
    saved = json.loads(record.read_text())
    saved["checksums"]["w"] ^= 1  # as if the array's bytes had changed
    record.write_text(json.dumps(saved))
    with pytest.raises(CheckpointUnreadableError) as info:
        ckpt.restore(like)
    assert str(info.value) == _step_2_damaged(tmp_path, "w differs from what was saved (checksum)")
    del saved["checksums"]  # a checkpoint written before they were: restores unchecked
    record.write_text(json.dumps(saved))
    assert ckpt.restore(like)[1] == {"iteration": 2}
    ckpt.close()


def test_a_host_record_is_checked_as_json_holds_it(tmp_path):
    """Integer keys come back as strings (and sort otherwise): the check must not call every
    such record damaged."""
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    state = {"w": jnp.arange(6.0)}
    ckpt.save(1, state, {"iteration": 1, "task_state": {2: "a", 10: "b", "x": (1, 2.5)}})
    _, host = ckpt.restore(abstract_like(state))
    assert host == {"iteration": 1, "task_state": {"2": "a", "10": "b", "x": [1, 2.5]}}
    ckpt.close()


def test_a_host_record_that_differs_from_its_checksum_is_refused_as_damaged(tmp_path):
    """The record says where the run resumes (its iteration, the dataset position): a
    damaged digit there resumed silently at another step."""
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    state = {"w": jnp.arange(6.0)}
    ckpt.save(1, state, {"iteration": 1})
    ckpt.save(2, state, {"iteration": 2, "task_state": {"index": 3}})
    record = next((tmp_path / "2" / "host").glob("*"))
    saved = json.loads(record.read_text())
    saved["task_state"]["index"] = 5
    record.write_text(json.dumps(saved))
    damaged = _step_2_damaged(tmp_path, "its host record differs from what was saved (checksum)")
    with pytest.raises(CheckpointUnreadableError) as info:
        ckpt.restore(abstract_like(state))
    assert str(info.value) == damaged
    with pytest.raises(CheckpointUnreadableError) as info:
        ckpt.restore_host()
    assert str(info.value) == damaged
    ckpt.close()


def test_bytes_damaged_on_disk_are_refused_not_restored(tmp_path):
    """64 bytes flipped inside the arrays' data file: before the checksums, 5 of 6 such
    damages restored as finite, wrong numbers."""
    import glob

    state = {"w": jax.random.normal(jax.random.key(0), (256, 256)), "m": jnp.ones((64, 64))}
    for trial in range(3):
        directory = tmp_path / str(trial)
        ckpt = Checkpointer(str(directory), interval=1, async_save=False)
        ckpt.save(1, state, {"iteration": 1})
        ckpt.close()
        data_files = glob.glob(f"{directory}/1/state/ocdbt.process_0/d/*")
        largest = max(data_files, key=os.path.getsize)
        data = bytearray(open(largest, "rb").read())
        start = len(data) // 2 + 97 * trial
        data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
        open(largest, "wb").write(bytes(data))
        with pytest.raises(CheckpointUnreadableError, match=r"checkpoint could not be read"):
            Checkpointer(str(directory), async_save=False).restore(abstract_like(state))


def test_only_orbax_echoes_of_a_failed_read_or_write_are_left_out(monkeypatch):
    """After a failed read, orbax's reads of the other arrays finish and print ~1,500 lines
    (an event loop closed, coroutines collected unfinished) around the one-line error; after
    a failed write, asyncio reports each unretrieved write future. Those are dropped; the
    same kinds of error from anyone else's code are not."""
    import asyncio
    import logging
    import types
    import warnings

    from novarl_jax.trainer import checkpoint

    reached = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reached.append(info.exc_value))
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: reached.append(error))
    monkeypatch.setattr(checkpoint, "_ECHOES_QUIET", False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", list(asyncio_log.filters))
    checkpoint.quiet_orbax_echoes()
    checkpoint.quiet_orbax_echoes()  # once per process: no second layer

    def closed_loop_error(in_user_code):
        loop = asyncio.new_event_loop()
        loop.close()
        try:
            if in_user_code:
                loop.call_soon_threadsafe(print)
            else:  # what orbax's reader threads run into, asyncio's frames alone
                asyncio.BaseEventLoop.call_soon_threadsafe(loop, print)
        except RuntimeError as e:
            tb = e.__traceback__
            return e, tb if in_user_code else tb.tb_next  # without this test's own frame

    echo, echo_tb = closed_loop_error(False)
    user, user_tb = closed_loop_error(True)
    sys.excepthook(RuntimeError, echo, echo_tb)
    orbax_reader = types.SimpleNamespace(
        cr_code=types.SimpleNamespace(co_filename="/venv/orbax/checkpoint/_src/serialization.py")
    )
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("x"), exc_traceback=None,
                                             object=orbax_reader))  # fmt: skip
    assert reached == []
    sys.excepthook(RuntimeError, user, user_tb)  # the user's own code: shown
    sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("y"), exc_traceback=None,
                                             object=None))  # fmt: skip
    assert [str(e) for e in reached] == ["Event loop is closed", "y"]

    def future_record(where):
        try:
            exec(compile("raise ValueError('write failed')", where, "exec"))
        except ValueError as e:
            error = e
        message = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture>"
        return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, message, (),
                                 (ValueError, error, error.__traceback__))  # fmt: skip

    orbax_write = future_record("/venv/orbax/checkpoint/_src/serialization.py")
    assert not checkpoint._not_an_orbax_future(orbax_write)
    assert checkpoint._not_an_orbax_future(future_record("/home/me/orbax-migration/reward.py"))
    plain = logging.LogRecord("asyncio", logging.ERROR, "x.py", 1, "Unclosed session", (), None)
    assert checkpoint._not_an_orbax_future(plain)
    # tensorstore's own writes on a full disk: no Python frames, the spec in the message.
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "params.policy.w/0.0": [tensorstore_spec'
                      '=\'{"driver":"zarr"}\']')  # fmt: skip
    message = "Future exception was never retrieved\nfuture: <Future finished exception=...>"
    tensorstore_write = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, message,
                                          (), (ValueError, full, None))  # fmt: skip
    assert not checkpoint._not_an_orbax_future(tensorstore_write)


def test_64_bit_leaves_are_summed_as_two_words_each():
    with jax.enable_x64(True):
        values = np.arange(6, dtype=np.float64) / 3
        sums = state_checksums({"d": jnp.asarray(values)})
        changed = values.copy()
        changed[4] = np.nextafter(changed[4], 2.0)  # the lowest bit of one value
        assert state_checksums({"d": jnp.asarray(changed)})["d"] != sums["d"]
        words = values.view(np.uint32).astype(np.uint64)
        assert sums["d"] == int((words * (2 * np.arange(12, dtype=np.uint64) + 1)).sum() % 2**32)
