"""Object-store URLs (``s3://bucket/prefix``; whatever obstore reaches) and the few calls we
make on them: whole and ranged GETs, PUTs (conditional where asked), listing.

Credentials and the endpoint come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``; ``AWS_ALLOW_HTTP=true`` for
a plain-HTTP endpoint such as a local test server), read by obstore; ``storage_options``
override them (``{"endpoint_url": ..., "allow_http": True, ...}``). The client is made lazily
in each process (obstore's runtime does not survive a fork), so an :class:`ObjectStore`
pickles as its URL and options only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from jasper_mmap.errors import (
    DependencyError,
    RemoteStoreError,
    StoreCorruptError,
    StoreNotFoundError,
)

__all__ = ["ObjectStore", "is_remote", "REMOTE_SCHEMES"]

#: URL schemes read as object stores (anything else is a local path)
REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "memory://")

#: storage_options keys that are obstore client options, not store config
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "timeout", "connect_timeout"}
#: common spellings (fsspec/boto3) of obstore's config keys
_ALIASES = {
    "endpoint_url": "endpoint",
    "aws_access_key_id": "access_key_id",
    "key": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "secret": "secret_access_key",
    "region_name": "region",
}


#: the process whose obstore runtime is live (obstore's runtime does not survive a fork: a
#: forked child that calls it hangs, so such a child never does: NOTE [node cache])
_RUNTIME_PID: int | None = None


def usable_here() -> bool:
    """False in a process forked from one that used obstore (its calls would hang)."""
    return _RUNTIME_PID in (None, os.getpid())


def is_remote(location: object) -> bool:
    """True for an object-store URL (a str starting with one of :data:`REMOTE_SCHEMES`)."""
    return isinstance(location, str) and location.lower().startswith(REMOTE_SCHEMES)


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise DependencyError(
            "reading or writing an object-store URL needs obstore: pip install obstore "
            "(or pip install 'jasper_mmap[remote]')"
        ) from None
    return obstore


class ObjectStore:
    """One store prefix (``s3://bucket/prefix``) and the calls made on it, with counters."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not is_remote(url):
            raise ValueError(f"{url!r} is not an object-store URL ({', '.join(REMOTE_SCHEMES)})")
        self.url = url.rstrip("/")
        self.options = dict(storage_options or {})
        self._client: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.bytes_fetched = 0
        self.gets = 0
        self.puts = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = self._make()
                    self._pid = os.getpid()
        return self._client

    def _make(self) -> Any:
        global _RUNTIME_PID
        if not usable_here():
            raise RemoteStoreError(
                f"{self.url}: this process was forked from one that used the object store, "
                f"and obstore cannot be used after a fork (its calls would hang). Use "
                f"worker_mode='thread' (the default), or multiprocessing_context='spawn' or "
                f"'forkserver' for worker processes."
            )
        _RUNTIME_PID = os.getpid()
        obstore = _obstore()
        config: dict[str, Any] = {}
        client: dict[str, Any] = {}
        for key, value in self.options.items():
            key = _ALIASES.get(key, key)
            if key in _CLIENT_KEYS:
                client[key] = value
            else:
                config[key] = value
        endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://") and "allow_http" not in client:
            allow = os.environ.get("AWS_ALLOW_HTTP", "")
            if allow.lower() in ("1", "true", "yes") or "endpoint" in config:
                client["allow_http"] = True
        try:
            return obstore.store.from_url(
                self.url, config=config or None, client_options=client or None
            )
        except Exception as e:
            raise RemoteStoreError(
                f"{self.url}: cannot make an object-store client ({type(e).__name__}: {e}). "
                f"Check the URL and storage_options (or the AWS_* environment)."
            ) from None

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _error(self, key: str, e: Exception, what: str) -> Exception:
        if isinstance(e, FileNotFoundError):
            return StoreNotFoundError(
                f"{self.where(key)}: {what}: the object does not exist. Check the URL (a store "
                f"uploaded by convert-pt or jasper-mmap upload)."
            )
        return RemoteStoreError(
            f"{self.where(key)}: {what} failed ({type(e).__name__}: {str(e)[:300]}). Check "
            f"the endpoint, the credentials (AWS_* environment or storage_options) and the "
            f"network, then run again."
        )

    def _count(self, nbytes: int, gets: int = 1) -> None:
        with self._count_lock:
            self.bytes_fetched += nbytes
            self.gets += gets

    def get(self, key: str) -> bytes:
        """The whole object ``key`` (small objects: manifests, catalogs, pointers)."""
        try:
            data = bytes(_obstore().get(self.client, key).bytes())
        except Exception as e:
            raise self._error(key, e, "GET") from None
        self._count(len(data))
        return data

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[memoryview]:
        """The byte ranges ``[(start, end), ...]`` of ``key``."""
        if not ranges:
            return []
        try:
            parts = _obstore().get_ranges(
                self.client, key, starts=[a for a, _ in ranges], ends=[b for _, b in ranges]
            )
        except BaseException as e:
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # (KeyboardInterrupt, SystemExit; obstore's panics are BaseException)
            short = type(e).__name__ == "PanicException" and "range start" in str(e)
            if short or "416 Range Not Satisfiable" in str(e):  # shorter than asked
                raise StoreCorruptError(
                    f"{self.where(key)}: bytes {min(a for a, _ in ranges)}-"
                    f"{max(b for _, b in ranges)} are past its end: the object was truncated "
                    f"after upload (or is being replaced). Upload the store again; nothing "
                    f"of it was used."
                ) from None
            raise self._error(key, e, f"GET of {len(ranges)} byte ranges") from None
        out = [memoryview(p) for p in parts]
        self._count(sum(len(p) for p in out), len(ranges))
        return out

    def put(self, key: str, data: Any, *, create: bool = False) -> None:
        """Write ``data`` (bytes or a local path) to ``key``; ``create``: only if no object of
        that name exists (a conditional write), else :class:`RemoteStoreError` (``lost``)."""
        obstore = _obstore()
        try:
            obstore.put(self.client, key, data, mode="create" if create else "overwrite")
        except Exception as e:
            if create and type(e).__name__ in ("AlreadyExistsError", "PreconditionError"):
                err = RemoteStoreError(f"{self.where(key)}: already exists (another writer)")
                err.lost = True
                raise err from None
            raise self._error(key, e, "PUT") from None
        with self._count_lock:
            self.puts += 1

    def delete(self, key: str) -> None:
        try:
            _obstore().delete(self.client, key)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._error(key, e, "DELETE") from None

    def list(self, prefix: str | None = None) -> list[dict[str, Any]]:
        """Objects under ``prefix`` (relative to the store's), each ``{path, size, ...}``."""
        try:
            out = []
            for batch in _obstore().list(self.client, prefix=prefix):
                out.extend(dict(m) for m in batch)
            return out
        except Exception as e:
            raise self._error(prefix or "", e, "LIST") from None
