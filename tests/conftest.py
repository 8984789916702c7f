"""Shared fixtures: a small random-weight DINOv3 saved like a real checkpoint, tiny geometry."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Markers from the services a test uses, so `pytest -m "not slurm and not s3 and not browser"` is the fast
# suite: a fixture named here marks every test that requests it (directly or through another fixture).
SERVICE_FIXTURES = {"slurm_cluster": "slurm", "moto_s3": "s3", "moto_alpha": "s3", "browser_session": "browser"}


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        for fixture, marker in SERVICE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# slice 64 = output 16 x (128 nm / 32 nm); 4 x 4 tokens per slice with patch 16
TINY_GEOMETRY_ARGS = ["--output-image-dim", "16", "--base-resolution", "128", "--min-resolution-for-raw", "32"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random DINOv3 written with save_pretrained, loaded as any local checkpoint."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_register_tokens=2,
    )
    path = tmp_path_factory.mktemp("model") / "tiny-dinov3"
    DINOv3ViTModel(config).save_pretrained(path)
    return path


def run_script(script: str, *args: str, check: bool = False, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def call_main(module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """Run a script's main() in this process (no interpreter start-up): same code path as
    the command line, with its exit status and printed output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = importlib.import_module(module).main([str(a) for a in args])
    result = subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{module} exited {code}:\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server_holding(root: Path, dataset: str, bucket: str = "cellmap-test", prefix: str = "data") -> Iterator[str]:
    """A real S3-compatible server (moto_server, CORS on) on 127.0.0.1 whose public bucket
    holds root/dataset under prefix; yields its endpoint URL."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=0.5)
                break
            except OSError:
                time.sleep(0.05)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=bucket, ACL="public-read")
        for file in sorted((root / dataset).rglob("*")):
            if file.is_file():
                client.upload_file(str(file), bucket, f"{prefix}/{file.relative_to(root).as_posix()}", ExtraArgs={"ACL": "public-read"})
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def preprocess_args(output_dir: Path, index: int, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--volume-index", str(index), "--output-dir", str(output_dir), "--source", "synthetic",
        "--model-id", str(model_dir), *TINY_GEOMETRY_ARGS, *extra,
    ]


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """A committed cache of volumes 0-2 (tiny geometry), built by the real CLI; read-only for tests."""
    out = tmp_path_factory.mktemp("cache")
    for index in range(3):
        call_main("preprocess_volume", *preprocess_args(out, index, tiny_model_dir), check=True)
    return out


def make_chunk_fill_valued(cache: Path, index: int, array: str, grid_index: tuple[int, ...]) -> None:
    """Leave one chunk as the writer leaves a chunk equal to the fill value: zeros, nothing
    stored for it (TensorStore stores no chunk equal to the fill value), and the checksum of
    zeros recorded in the (resealed) metadata."""
    import math
    import zlib

    import tensorstore as ts

    from dinov3_cache.paths import VolumePaths
    from dinov3_cache.records import read_json, write_json_atomic
    from dinov3_cache.schema import seal_metadata
    from dinov3_cache.zarr_arrays import ZARR_DRIVERS, chunk_key, read_array_metadata

    paths = VolumePaths(cache, index)
    stored = read_array_metadata(paths.array(array))
    kvstore = {"driver": "file", "path": str(paths.array(array))}
    store = ts.open({"driver": ZARR_DRIVERS[stored.zarr_format], "kvstore": kvstore}).result()
    region = tuple(slice(g * c, min(s, (g + 1) * c)) for g, c, s in zip(grid_index, stored.chunks, stored.shape))
    store[region] = 0
    metadata = read_json(paths.metadata)
    nbytes = math.prod(r.stop - r.start for r in region) * store.dtype.numpy_dtype.itemsize  # edge chunks cropped
    metadata["integrity"]["crc32"][array][chunk_key(grid_index)] = zlib.crc32(bytes(nbytes))
    write_json_atomic(paths.metadata, seal_metadata(metadata))
