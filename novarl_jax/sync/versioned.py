"""Versioned policy parameters and the thread-safe store the trainer publishes them to.

The trainer publishes an immutable :class:`VersionedParams` per weight broadcast; each rollout
worker *acquires* the latest one before it samples and holds it until its next acquire. The
store keeps the latest version and every version a worker still holds, and frees the rest, so
at most ``num_workers + 1`` copies of the parameters are alive at once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable
from typing import Any

from novarl_jax.core.checks import check_int


@dataclasses.dataclass(frozen=True)
class VersionedParams:
    """An immutable (version, parameters) pair: what one weight broadcast carries.

    Attributes:
        version: the trainer's policy version (optimizer updates applied) of ``params``.
        params: the policy parameter pytree. It must not be mutated or donated afterwards:
            publish a copy of a train state whose buffers a jitted step donates.

    Raises:
        ValueError: ``version`` is not an integer >= 0.
    """

    version: int
    params: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", check_int("version", self.version, 0))


class ParamStore:
    """Thread-safe publish/acquire of :class:`VersionedParams`.

    ``publish`` (trainer) adds a strictly newer version; ``acquire(worker)`` (a rollout worker)
    returns the latest and records that ``worker`` now holds it; ``release(worker)`` forgets
    the worker. Versions that are neither the latest nor held by a worker are dropped at once,
    so their buffers can be freed.

    Example:
        >>> store = ParamStore()
        >>> store.publish(0, params)  # doctest: +SKIP
        >>> held = store.acquire("worker0")  # doctest: +SKIP
        >>> store.publish(4, new_params)  # doctest: +SKIP
        >>> store.worker_versions()  # {'worker0': 0}  # doctest: +SKIP
        >>> store.kept_versions()  # (0, 4): version 0 is still held  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[int, VersionedParams] = {}
        self._latest: VersionedParams | None = None
        self._held: dict[Hashable, int] = {}

    def publish(self, version: int, params: Any) -> VersionedParams:
        """Makes ``params`` the latest version.

        Raises:
            ValueError: ``version`` is not greater than the latest published version.
        """
        entry = VersionedParams(version, params)
        with self._lock:
            if self._latest is not None and entry.version <= self._latest.version:
                raise ValueError(
                    f"version must increase: got {entry.version} after {self._latest.version}"
                )
            self._latest = entry
            self._kept[entry.version] = entry
            self._prune()
        return entry

    def latest(self) -> VersionedParams | None:
        """The latest published version, or None before the first publish."""
        with self._lock:
            return self._latest

    def get(self, version: int) -> VersionedParams:
        """A kept version (the latest, or one a worker holds).

        Raises:
            KeyError: ``version`` was never published or has been dropped.
        """
        with self._lock:
            if version not in self._kept:
                raise KeyError(
                    f"version {version!r} is not kept; kept versions: {sorted(self._kept)}"
                )
            return self._kept[version]

    def acquire(self, worker: Hashable) -> VersionedParams:
        """The latest version, now held by ``worker`` (releasing what it held before).

        Raises:
            LookupError: nothing has been published yet.
        """
        with self._lock:
            if self._latest is None:
                raise LookupError("nothing has been published yet; publish version 0 first")
            self._held[worker] = self._latest.version
            self._prune()
            return self._latest

    def release(self, worker: Hashable) -> None:
        """Forgets ``worker`` (it holds nothing); unknown workers are ignored."""
        with self._lock:
            self._held.pop(worker, None)
            self._prune()

    def worker_versions(self) -> dict[Hashable, int]:
        """{worker: version it holds}, a snapshot."""
        with self._lock:
            return dict(self._held)

    def kept_versions(self) -> tuple[int, ...]:
        """The versions whose parameters are still referenced, ascending."""
        with self._lock:
            return tuple(sorted(self._kept))

    def _prune(self) -> None:
        # Called with the lock held.
        needed = set(self._held.values())
        if self._latest is not None:
            needed.add(self._latest.version)
        for version in [v for v in self._kept if v not in needed]:
            del self._kept[version]
