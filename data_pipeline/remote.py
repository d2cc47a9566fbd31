"""Shard directories in an S3-compatible object store (AWS S3, MinIO, Ceph, R2, GCS's S3 API).

A location is a local path or ``s3://bucket/prefix``. The client is boto3's: the endpoint,
region and credentials come from what every AWS tool reads (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``
and ``~/.aws/config``), nothing of ours.

Every request goes through `ObjectStore._call`: transient failures (connection refused or
reset, timeouts, HTTP 5xx, throttling) are retried with exponential backoff until a budget
of ``RTDSPEED_S3_RETRY_SECONDS`` seconds (default 120) is spent, then a `RemoteError` names
the object, the attempts and the last error; a permanent one (no such bucket or key, bad
credentials, access denied) is a `RemoteError` at once, saying what to check.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

SCHEME = "s3://"
RETRY_ENV = "RTDSPEED_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
_CHUNK = 1 << 20
T = TypeVar("T")

# S3 error codes worth another attempt (besides HTTP 5xx and 429)
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
}
_CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy"
)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    mtime_ns: int  # LastModified


class RemoteError(RuntimeError):
    """An object-store request that failed for good; the message names the object."""


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


def join(location: str | Path, *parts: str) -> str | Path:
    """`location / part / ...` for a local path or an s3:// URL."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location).joinpath(*parts)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # no leading or trailing slash; "" for the bucket's root

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not is_remote(url):
            raise ValueError(f"{url!r} is not an s3:// URL")
        bucket, _, key = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise ValueError(f"{url!r}: no bucket name (write s3://BUCKET/PREFIX)")
        return cls(bucket, key.strip("/"))

    def child(self, *parts: str) -> S3Url:
        return S3Url(self.bucket, "/".join(p for p in (self.key, *parts) if p))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


def retry_budget() -> float:
    raw = os.environ.get(RETRY_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise RemoteError(f"{RETRY_ENV}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise RemoteError(f"{RETRY_ENV}={raw!r} must be >= 0")
    return value


def _sdk_error(e: BaseException) -> BaseException:
    """The SDK's own error inside a wrapper (boto3's S3UploadFailedError wraps the
    ClientError or connection error of the transfer that failed)."""
    from boto3.exceptions import S3UploadFailedError

    seen = 0
    while isinstance(e, S3UploadFailedError) and seen < 8:
        inner = e.__cause__ or e.__context__
        if inner is None:
            break
        e, seen = inner, seen + 1
    return e


def _transient(e: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or _code(e) in _TRANSIENT_CODES
    transient = (
        EndpointConnectionError,
        ConnectionClosedError,
        BotoConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
        Urllib3Error,
        ConnectionError,
        TimeoutError,
    )
    return isinstance(e, transient)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"


def explain(e: Exception, url: S3Url) -> str:
    """What a user can act on, for a permanent error (no SDK frames)."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    code = _code(e)
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return f"{url}: no AWS credentials found ({e}); {_CREDENTIALS_HINT}"
    if code in _CREDENTIAL_CODES or code == "403":
        refused = f"access refused by {_endpoint()} ({code}: {_message(e)})"
        return f"{url}: {refused}; {_CREDENTIALS_HINT}"
    if code == "NoSuchBucket" or (code == "404" and not url.key):
        return (
            f"{url}: bucket {url.bucket!r} does not exist at {_endpoint()} (check the URL, and "
            "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for a non-AWS store)"
        )
    if code in ("NoSuchKey", "404"):
        return f"{url}: no such object"
    return f"{url}: {type(e).__name__}: {e}"


def _message(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Message", e))


def missing(e: Exception | None) -> bool:
    """A 404: the object (not the bucket) is not there."""
    return e is not None and _code(e) in ("NoSuchKey", "404")


class ObjectStore:
    """boto3's S3 client, every request retried (see the module docstring). Thread-safe:
    boto3 clients may be shared between threads, which the cache's prefetchers do."""

    def __init__(self, client=None, budget_s: float | None = None, sleep=time.sleep):
        if client is None:
            import boto3
            from botocore.config import Config

            # one attempt per call inside botocore: the retries (and their budget) are ours
            config = Config(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=32,
            )
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self.budget_s = retry_budget() if budget_s is None else budget_s
        self._sleep = sleep

    def _call(self, what: S3Url, fn: Callable[[], T]) -> T:
        start, attempt, delay = time.monotonic(), 0, 0.2
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as wrapped:  # classified below; the SDK's own exceptions vary
                e = _sdk_error(wrapped)
                if not _transient(e):
                    raise RemoteError(explain(e, what)) from e
                spent = time.monotonic() - start
                if spent + delay > self.budget_s:
                    raise RemoteError(
                        f"{what}: {attempt} attempt(s) in {spent:.1f} s failed, the retry "
                        f"budget ({RETRY_ENV}={self.budget_s:g}) is spent; last error: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                self._sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)

    def get_bytes(self, url: S3Url) -> bytes:
        def get():
            return self.client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()

        return self._call(url, get)

    def download(self, url: S3Url, dest: Path) -> str:
        """Stream an object into `dest` (truncated first on every attempt); its sha256."""

        def get() -> str:
            body = self.client.get_object(Bucket=url.bucket, Key=url.key)["Body"]
            digest = hashlib.sha256()
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
            return digest.hexdigest()

        return self._call(url, get)

    def upload(self, local: Path, url: S3Url) -> None:
        # boto3's managed transfer (s3transfer: one PUT, or a multipart upload above 8 MiB),
        # the client every read here uses too. pyarrow.fs's multipart upload had been seen
        # failing against moto 5.2's server (our tests' S3 stand-in); with moto 5.2.5 and
        # pyarrow 26.0.1 it worked when checked (20 and 120 MB objects), so that is not why:
        # boto3 gives typed errors to classify as transient or not, and reads AWS profiles
        # and AWS_ENDPOINT_URL_S3 as the aws CLI does.
        self._call(url, lambda: self.client.upload_file(str(local), url.bucket, url.key))

    def put_bytes(self, data: bytes, url: S3Url) -> None:
        self._call(url, lambda: self.client.put_object(Bucket=url.bucket, Key=url.key, Body=data))

    def delete(self, url: S3Url) -> None:
        self._call(url, lambda: self.client.delete_object(Bucket=url.bucket, Key=url.key))

    def get_range(self, url: S3Url, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (one ranged GET, retried as a whole)."""

        def get() -> bytes:
            body = self.client.get_object(
                Bucket=url.bucket, Key=url.key, Range=f"bytes={start}-{end - 1}"
            )["Body"]
            data = body.read()
            if len(data) != end - start:  # a connection cut mid-body reads short: retried
                raise ConnectionError(f"short read: {len(data)} of {end - start} bytes")
            return data

        return self._call(url, get)

    def objects(self, prefix: S3Url, start: str | None = None) -> dict[str, ObjectInfo]:
        """{key relative to `start`: ObjectInfo} of every object whose key begins with
        `start` (default: the prefix as a directory, ``prefix/``)."""
        if start is None:
            start = f"{prefix.key}/" if prefix.key else ""

        def listing() -> dict[str, ObjectInfo]:
            found = {}
            pages = self.client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=prefix.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    when = obj["LastModified"].timestamp()
                    found[obj["Key"][len(start) :]] = ObjectInfo(int(obj["Size"]), int(when * 1e9))
            return found

        return self._call(prefix, listing)

    def sizes(self, prefix: S3Url) -> dict[str, int]:
        """{key relative to the prefix: bytes} of every object under it."""
        return {key: info.size for key, info in self.objects(prefix).items()}


def check_bucket(store: ObjectStore, url: S3Url) -> None:
    """Fail early, with a message a user can act on, when the bucket is absent or refused."""
    store._call(url, lambda: store.client.head_bucket(Bucket=url.bucket))
