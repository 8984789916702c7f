"""Where CellMap data lives: local paths and s3:// URLs, TensorStore kvstores and contexts,
small JSON reads and directory listings, and one-line storage errors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import tensorstore as ts

from dinov3_cache.sources.base import SourceError

S3_DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Options:
    """How s3:// URLs are reached. Credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    (or AWS_PROFILE) when set, anonymous otherwise (public buckets)."""

    endpoint: str | None = None
    region: str = field(default_factory=lambda: os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or S3_DEFAULT_REGION)
    retries: int = 4

    @property
    def anonymous(self) -> bool:
        return not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"))

    def credentials_spec(self) -> dict:
        if self.anonymous:
            return {"type": "anonymous"}
        return {"type": "environment"} if os.environ.get("AWS_ACCESS_KEY_ID") else {"type": "default"}

    def where(self) -> str:
        return self.endpoint or "AWS S3"


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise SourceError(f"{url!r} names no bucket; write s3://bucket/prefix")
    return bucket, key.strip("/")


def join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def is_absolute(url: str) -> bool:
    return url.startswith("/") or "://" in url


def kvstore_spec(url: str, s3: S3Options) -> dict:
    """TensorStore kvstore for a directory URL (local path or s3://)."""
    if not is_s3(url):
        return {"driver": "file", "path": url.rstrip("/") + "/"}
    bucket, key = split_s3(url)
    spec = {
        "driver": "s3", "bucket": bucket, "path": key + "/" if key else "",
        "aws_region": s3.region, "aws_credentials": s3.credentials_spec(),
    }
    if s3.endpoint:
        spec["endpoint"] = s3.endpoint
    return spec


def tensorstore_context(s3: S3Options, num_threads: int = 8) -> ts.Context:
    # bounded retries: an unreachable endpoint fails within seconds instead of minutes
    return ts.Context({
        "s3_request_retries": {"max_retries": s3.retries, "initial_delay": "0.2s", "max_delay": "4s"},
        "data_copy_concurrency": {"limit": num_threads},
        "file_io_concurrency": {"limit": num_threads},
    })


def storage_error(url: str, error: Exception, s3: S3Options) -> SourceError:
    """One line for a TensorStore failure: unreachable endpoint, denied, or anything else."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "CURL error" in text or "Could not connect" in text or "Could not resolve" in text:
        return SourceError(
            f"cannot reach the S3 endpoint {s3.where()} for {url} ({text[-160:]}); check --s3-endpoint and the network"
        )
    if "PERMISSION_DENIED" in text or "403" in text:
        return SourceError(
            f"access to {url} denied ({text[:160]}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for a private bucket"
        )
    return SourceError(f"cannot read {url}: {text[:200]}")


class Storage:
    """Small-file reads and directory listings for local paths and s3:// URLs."""

    def __init__(self, s3: S3Options | None = None, num_threads: int = 8):
        self.s3 = s3 or S3Options()
        self.context = tensorstore_context(self.s3, num_threads)

    def read_json(self, url: str) -> dict | None:
        """The JSON document at url, None if there is none; SourceError if unreadable."""
        directory, _, name = url.rpartition("/")
        try:
            kv = ts.KvStore.open(kvstore_spec(directory, self.s3), context=self.context).result()
            result = kv.read(name).result()
        except (ValueError, RuntimeError) as e:
            raise storage_error(url, e, self.s3) from None
        if result.state != "value":
            return None
        try:
            value = json.loads(result.value)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{url} is not valid JSON ({e}); repair or remove it") from None
        return value

    def list_dirs(self, url: str) -> list[str]:
        """Names of the sub-directories (S3: common prefixes) of url, sorted."""
        if not is_s3(url):
            try:
                return sorted(e.name for e in os.scandir(url) if e.is_dir())
            except FileNotFoundError:
                return []
            except OSError as e:
                raise SourceError(f"cannot list {url} ({e.strerror})") from None
        return sorted(self._s3_prefixes(url))

    def _s3_prefixes(self, url: str) -> Iterable[str]:
        # A delimiter listing returns one entry per sub-directory, not every chunk below it.
        bucket, key = split_s3(url)
        prefix = key + "/" if key else ""
        client = self._s3_client()
        import botocore.exceptions as bex

        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"][len(prefix):].rstrip("/")
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError) as e:
            raise SourceError(f"cannot reach the S3 endpoint {self.s3.where()} ({e}); check --s3-endpoint and the network") from None
        except bex.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            raise SourceError(f"cannot list {url} on {self.s3.where()} ({code}); check the bucket name and credentials") from None
        except bex.BotoCoreError as e:
            raise SourceError(f"cannot list {url} on {self.s3.where()} ({e}); check the AWS_* variables and --s3-endpoint") from None

    def _s3_client(self):
        try:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config
        except ImportError:
            raise SourceError("scanning an s3:// data root needs boto3 (pip install boto3), or pass --catalog FILE") from None
        config = Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": self.s3.retries},
            signature_version=UNSIGNED if self.s3.anonymous else None,
        )
        try:
            return boto3.client("s3", endpoint_url=self.s3.endpoint, region_name=self.s3.region, config=config)
        except Exception as e:  # botocore raises many kinds here (bad profile, bad endpoint URL)
            raise SourceError(f"cannot set up an S3 client for {self.s3.where()} ({e}); check the AWS_* variables and --s3-endpoint") from None
