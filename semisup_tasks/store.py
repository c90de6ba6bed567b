"""One object store, addressed by a root URI: ``file://`` (embedded default) or ``s3://``.

Every stage reads and writes through :class:`Store` with keys relative to the root
(``runs/<run_id>/score/part-00000.parquet``), so the same code serves a local folder and any
S3-compatible server. S3 endpoint and credentials come from the standard AWS environment
variables or profiles (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never from arguments.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS = "_SUCCESS.json"


class StoreError(Exception):
    """A store problem a user can fix (bad URI, missing object, unreachable server)."""


def clean_key(key: str) -> str:
    """Normalise a key and refuse one that could escape the root.

    Keys are literal (no URL decoding): ``photo%201.png`` is a file of that name, and ``%2e%2e``
    is a folder name, never a parent reference.
    """
    raw = key.replace("\\", "/")
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in raw):  # NUL, C0/C1 controls: tools disagree on them
        raise StoreError(f"Store key {key!r} contains a control character; use printable names.")
    if raw.startswith("/") or any(part == ".." for part in raw.split("/")):
        raise StoreError(f"Store key {key!r} escapes the store root; use a relative key without '..'.")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts:
        raise StoreError(f"Store key {key!r} is empty.")
    return "/".join(parts)


def join(*parts: str) -> str:
    return posixpath.join(*[p.strip("/") for p in parts if p])


def run_prefix(run_id: str) -> str:
    """``runs/<run id>``; Airflow run ids carry ':' and '+', so keep keys portable across file systems and S3 tools."""
    if not run_id or set(run_id) <= {"."}:
        raise StoreError(f"Run id {run_id!r} is not valid; use a non-empty name.")
    return join("runs", re.sub(r"[^A-Za-z0-9._-]", "_", run_id))


class Store(ABC):
    """Bytes in, bytes out, plus the JSON and Parquet helpers every stage uses."""

    uri: str

    @staticmethod
    def from_uri(uri: str) -> Store:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            # file://./rel and file:///abs both work; netloc carries the first part of a relative path
            path = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
            return FileStore(Path(path or "."))
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise StoreError(f"Store URI {uri!r} has no bucket; write it as s3://bucket/prefix.")
            return S3Store(parsed.netloc, parsed.path.strip("/"))
        if parsed.scheme == "":
            return FileStore(Path(uri))
        raise StoreError(f"Store URI {uri!r} is not supported; use file://PATH or s3://BUCKET/PREFIX.")

    # -- primitives ---------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole: readers see the old object or the new one, never a part."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def url(self, key: str) -> str:
        """The full URI of a key, for reports and for tools outside semisup."""

    @abstractmethod
    def check(self, write: bool = False) -> None:
        """Fail early, with one sentence, when the store cannot be reached (with ``write``: or written)."""

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    # -- documents ----------------------------------------------------------------------------
    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(key)), columns=columns)

    def write_table(self, key: str, table: pa.Table) -> str:
        """Write a Parquet object; returns the sha256 of its bytes (a content fingerprint)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        self.write_bytes(key, data)
        return hashlib.sha256(data).hexdigest()


class FileStore(Store):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.uri = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def check(self, write: bool = False) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if write:  # a read-only store fails here, not at the first save after hours of training
                fd, probe = tempfile.mkstemp(dir=self.root, prefix=".semisup-write-check.", suffix=".tmp")
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"Cannot use {self.uri} as the store ({exc.strerror}); pick a writable folder.") from None

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self.url(key)} does not exist.") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # temp file + rename: a crash leaves the old object or none, never half of one
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return self.uri + "/" + clean_key(key)



# Retries for flaky storage, all in one place and all done by the AWS libraries (no loops here).
# - Every S3 request: botocore's "standard" mode retries 500/502/503/504, throttling (503 SlowDown)
#   and connection errors (refused, reset, timeouts) with exponential backoff and jitter (50 ms
#   base, 1 s for throttling, at most 20 s), up to total_max_attempts tries in all.
# - A GET's body is streamed after that retried call has returned, so a reset mid-body escapes
#   botocore; s3transfer (download_fileobj) retries the GET on those errors (socket errors, read
#   timeouts, IncompleteRead, ResponseStreamingError), up to num_download_attempts.
# - check() uses few attempts and short timeouts: an unreachable store ends in one sentence within
#   seconds, where the stage client (10 tries, 10 s to connect, 120 s to read) could take minutes.
_RETRY_ATTEMPTS = 10
_CLIENT_CONFIG = {"retries": {"total_max_attempts": _RETRY_ATTEMPTS, "mode": "standard"},
                  "connect_timeout": 10, "read_timeout": 120}
_CHECK_CONFIG = {"retries": {"total_max_attempts": 4, "mode": "standard"}, "connect_timeout": 2, "read_timeout": 3}
_DOWNLOAD_ATTEMPTS = _RETRY_ATTEMPTS


class S3Store(Store):
    # S3's maximum; a test lowers it to page through a listing under faults
    list_page_size = 1000

    def __init__(self, bucket: str, prefix: str):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = boto3.client("s3", config=Config(**_CLIENT_CONFIG))
        self._download = TransferConfig(num_download_attempts=_DOWNLOAD_ATTEMPTS)

    def _key(self, key: str) -> str:
        return join(self.prefix, clean_key(key)) if self.prefix else clean_key(key)

    def _fail(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"Could not {what} ({exc.__class__.__name__}: {exc}); check the store URI, "
                          "AWS_ENDPOINT_URL and the AWS credentials.")

    def check(self, write: bool = False) -> None:
        # (write is not probed on S3: a test PUT would need delete rights too; a refused PUT names itself)
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", config=Config(**_CHECK_CONFIG))
        try:
            client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises many unrelated types here
            raise self._fail(f"reach bucket {self.bucket!r}", exc) from None
        finally:
            client.close()

    def _call(self, what: str, fn, **kwargs):
        """One S3 call; errors the user can fix become one StoreError sentence (retries are botocore's)."""
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(what) from None
            raise self._fail(what, exc) from None
        except (BotoCoreError, RetriesExceededError, S3DownloadFailedError) as exc:
            raise self._fail(what, exc) from None

    def read_bytes(self, key: str) -> bytes:
        # download_fileobj, not get_object: only s3transfer retries a GET whose body breaks off. Its
        # HEAD first (for the size) costs one round trip per read: +15% on the tiny pipeline on moto.
        buf = io.BytesIO()
        try:
            self._call(f"read {self.url(key)}", self._client.download_fileobj, Key=self._key(key), Fileobj=buf,
                       Config=self._download)
        except FileNotFoundError:
            raise StoreError(f"{self.url(key)} does not exist.") from None
        return buf.getvalue()

    def write_bytes(self, key: str, data: bytes) -> None:
        # a single PUT is atomic on S3: readers see the old object or the new one
        self._call(f"write {self.url(key)}", self._client.put_object, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"check {self.url(key)}", self._client.head_object, Key=self._key(key))
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(f"list {self.uri}/{prefix}", paginator.paginate, Prefix=full,
                           PaginationConfig={"PageSize": self.list_page_size})
        keys = []
        try:
            for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:  # pages are fetched lazily; botocore raises several types
            raise self._fail(f"list {self.uri}/{prefix}", exc) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call(f"delete {self.url(key)}", self._client.delete_object, Key=self._key(key))

    def url(self, key: str) -> str:
        return f"{self.uri}/{clean_key(key)}"
