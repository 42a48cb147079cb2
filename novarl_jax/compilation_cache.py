"""JAX's persistent compilation cache for the command line: where it lives, its size bound,
and the repair of entries JAX's size-limited cache cannot use."""

from __future__ import annotations

import importlib.util
import os
import zlib

from novarl_jax.cli_overrides import file_in_the_way


def compilation_cache_dir(flag: str | None) -> str | None:
    """The persistent compilation cache's directory for the ``--compilation_cache`` value."""
    if flag is None:
        flag = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            "~", ".cache", "novarl_jax", "xla"
        )
    return os.path.abspath(os.path.expanduser(flag)) if flag else None


def use_compilation_cache(flag: str | None) -> None:
    """Points JAX's persistent compilation cache at ``compilation_cache_dir(flag)`` (off for
    ``''``), bounded to 4 GiB when JAX can bound it, after :func:`repair_compilation_cache`.

    Raises:
        ValueError: (naming the flag or the variable that gave the directory) the directory,
            or a directory above it, is a file; or a directory given
            (by the flag or JAX_COMPILATION_CACHE_DIR) cannot be created or written. The
            default one is then left off instead: the run goes on without a cache.
    """
    path = compilation_cache_dir(flag)
    # Errors name where the directory came from: the flag, or the environment.
    given = flag is not None or bool(os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    source = "--compilation_cache" if flag is not None else "JAX_COMPILATION_CACHE_DIR"
    if path and (blocker := file_in_the_way(path)):
        raise ValueError(f"{source}: {blocker} is a file, not a directory")
    if path and (problem := _unwritable(path)):
        if given:
            raise ValueError(f"{source}: {path}: {problem}")
        path = None  # the default place: compile every time rather than fail
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if path:
        # Every program the run compiles for longer than a second is kept (JAX's default);
        # past 4 GiB the least recently used entries go, unless a size was given
        # (JAX_COMPILATION_CACHE_MAX_SIZE; -1 = no bound: JAX's bounded cache reads every
        # entry's size and time on each write, slow for a cache of many small programs).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        if (
            "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ
            and jax.config.jax_compilation_cache_max_size == -1
            and importlib.util.find_spec("filelock") is not None
        ):
            jax.config.update("jax_compilation_cache_max_size", 4 << 30)
        if jax.config.jax_compilation_cache_max_size not in (-1, 0):
            repair_compilation_cache(path)


def _unwritable(path: str) -> str | None:
    """Why the cache directory ``path`` cannot be used (made if missing), or None."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot be created ({e.strerror})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


# JAX's size-limited cache (jax/_src/lru_cache.py): an entry `<key>-cache` (the compressed
# executable) and `<key>-atime` (its last use, time.time_ns() as 8 little-endian bytes), both
# written under `.lockfile`.
_CACHE_SUFFIX, _ATIME_SUFFIX, _CACHE_LOCK = "-cache", "-atime", ".lockfile"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _cut_off(entry: bytes) -> bool:
    """Whether a cache entry is a compressed executable cut off part way (empty, or in a
    format JAX writes, zstd or zlib, that does not decompress)."""
    if not entry:
        return True
    if entry[:4] == _ZSTD_MAGIC:
        try:
            from compression import zstd  # Python 3.14

            decompress, error = zstd.decompress, zstd.ZstdError
        except ImportError:
            try:
                import zstandard
            except ImportError:
                return False  # cannot tell
            decompress, error = zstandard.ZstdDecompressor().decompress, zstandard.ZstdError
        try:
            decompress(entry)
        except error:
            return True
        return False
    if len(entry) >= 2 and entry[0] & 0x0F == 8 and (entry[0] << 8 | entry[1]) % 31 == 0:
        try:
            zlib.decompress(entry)
        except zlib.error:
            return True
    return False


def repair_compilation_cache(path: str, *, lock_timeout_s: float = 10) -> tuple[int, int]:
    """Prepares a compilation cache directory for JAX's size-limited cache.

    That cache reads every entry's ``<key>-atime`` file before it writes a new entry, and
    one missing (an entry of JAX's unlimited cache, or a write cut off between the two
    files) fails every write. Each ``<key>-cache`` file without one gets it, holding the
    entry's modification time, so the least recently written entries go first; an entry
    cut off part way (it could never be read, and JAX would not write its key again) is
    removed instead. Other files are left alone. Does nothing if the directory is missing
    or another process holds the cache's lock for ``lock_timeout_s``.

    Returns:
        The numbers of entries given an ``-atime`` file and of entries removed.
    """
    if not os.path.isdir(path):
        return 0, 0
    try:
        import filelock
    except ImportError:  # JAX's size-limited cache needs it too
        return 0, 0
    repaired = removed = 0
    try:
        lock = filelock.FileLock(os.path.join(path, _CACHE_LOCK), timeout=lock_timeout_s)
        with lock:
            names = set(os.listdir(path))
            for name in sorted(names):
                key = name[: -len(_CACHE_SUFFIX)]
                entry = os.path.join(path, name)
                if (
                    not name.endswith(_CACHE_SUFFIX)
                    or key + _ATIME_SUFFIX in names
                    or not os.path.isfile(entry)
                ):
                    continue
                try:
                    with open(entry, "rb") as f:
                        cut_off = _cut_off(f.read())
                    if cut_off:
                        os.remove(entry)
                        removed += 1
                        continue
                    partial = os.path.join(path, f".{key}{_ATIME_SUFFIX}.writing")
                    with open(partial, "wb") as f:
                        f.write(os.stat(entry).st_mtime_ns.to_bytes(8, "little"))
                    os.replace(partial, os.path.join(path, key + _ATIME_SUFFIX))
                    repaired += 1
                except OSError:
                    continue  # unreadable here: JAX reports what still fails
    except (filelock.Timeout, OSError):
        pass  # the lock: JAX reports what still fails; the run goes on
    return repaired, removed
