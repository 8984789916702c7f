#!/usr/bin/env python
"""The cost of checking volumes against their source, against reading their crops again.

    python -m benchmarks.bench_source_check [--volumes 4] [--repeats 3] [--no-s3] [--extraction]

Builds a CellMap-layout dataset (raw 320^3 uint8 at 32 nm, labels 80^3 uint64 at 128 nm, 64^3
chunks, blosc-zstd), samples --volumes crops (output 64, base 128 nm, raw 32 nm: 256^3 raw and
64^3 labels each) with their signatures, then times, interleaved, over the same volumes:
checking every signature (CellMapSource.check_signature: metadata documents, then each touched
chunk's size and mtime, or its ETag) and reading every crop again (CellMapSource.sample, the
draw included). Local files (page cache warm for both) and, unless --no-s3, the same dataset
on a local moto_server. Prints the medians and their ratio (target <= 0.05 with nothing
changed), and what signing adds to a crop read at extraction; --extraction also times
preprocess_volume.py with and without signing (their ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dinov3_cache.sources.base import CropGeometry, LabelFilters, SamplingOptions
from dinov3_cache.sources.cellmap import CellMapSource, S3Options, Storage, prepare_catalog
from dinov3_cache.sources.cellmap import source as cellmap_source
from dinov3_cache.sources.cellmap.signing import Snapshot
from tests.cellmap_data import crop_group, level_translation, ome_multiscales, raw_group, write_array, write_group_attributes

RAW_VOXELS, RAW_NM = 320, 32.0
LABEL_VOXELS, LABEL_NM = 80, 128.0
GEOMETRY = CropGeometry(base_resolution=128.0, min_resolution_for_raw=32.0, output_image_dim=64)
OPTIONS = SamplingOptions(organelles=("mito",), filters=LabelFilters(0.0, 0, 0.0))
DATASET = "jrc_bench"


def build_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (RAW_VOXELS,) * 3, dtype=np.uint8)
    group = raw_group(root, DATASET)
    write_array(group / "s0", raw, "zarr", (64, 64, 64))
    write_group_attributes(group, "zarr", ome_multiscales([("s0", [RAW_NM] * 3, level_translation([0, 0, 0], [RAW_NM] * 3))]))
    labels = (rng.integers(0, 50, (LABEL_VOXELS,) * 3) + 2**33).astype(np.uint64)
    group = crop_group(root, DATASET, "crop1", "mito")
    write_array(group / "s0", labels, "zarr", (64, 64, 64))
    write_group_attributes(group, "zarr", ome_multiscales([("s0", [LABEL_NM] * 3, level_translation([0, 0, 0], [LABEL_NM] * 3))]))


def seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(label: str, source: CellMapSource, volumes: int, repeats: int) -> float:
    crops = [source.sample(i, GEOMETRY, OPTIONS) for i in range(volumes)]
    signatures = [(c.description["signature"], c.description) for c in crops]
    chunks = sum(len(a["chunks"]) for s, _ in signatures for a in s["arrays"].values())
    signature_bytes = statistics.mean(len(json.dumps(s)) for s, _ in signatures)

    def check_all() -> None:
        source.snapshot = Snapshot(source.storage)  # as a new check_preprocessing.py run: nothing read yet
        verdicts = [source.check_signature(s, d) for s, d in signatures]
        assert all(v.status == "current" for v in verdicts), [v.detail for v in verdicts]

    def read_all() -> None:
        for i in range(volumes):
            source.sample(i, GEOMETRY, OPTIONS)

    signing_seconds = []
    sign = cellmap_source.sign_reads

    def timed_signing(*args):  # the signing inside each crop read, timed there
        started = time.perf_counter()
        try:
            return sign(*args)
        finally:
            signing_seconds.append(time.perf_counter() - started)

    checks, reads, signing = [], [], []
    cellmap_source.sign_reads = timed_signing
    try:
        for _ in range(repeats):  # interleaved: both see the same machine load
            checks.append(seconds(check_all))
            signing_seconds.clear()
            reads.append(seconds(read_all))
            signing.append(sum(signing_seconds))
    finally:
        cellmap_source.sign_reads = sign
    check, read = statistics.median(checks), statistics.median(reads)
    print(f"{label}: {volumes} volumes, {chunks} touched chunks, {signature_bytes / 1000:.1f} KB of signature per volume")
    print(f"  check sources : {check * 1000:8.1f} ms")
    print(f"  re-read crops : {read * 1000:8.1f} ms")
    print(f"  ratio check / re-read: {check / read:.4f} (target <= 0.05)")
    per_volume = statistics.median(signing) / volumes
    print(f"  signing at extraction: {per_volume * 1000:.1f} ms per volume, {per_volume / (read / volumes) * 100:.1f}% of its crop read, signing included "
          "(hashes on threads; the crop read itself runs beside the model in a multi-volume run)")
    return check / read


def measure_extraction(root: Path, work: Path, volumes: int, repeats: int) -> None:
    """preprocess_volume.py (random:tiny on the CPU, output 32: raw 128^3 per volume) with
    signing and with signing replaced by an empty signature, alternating; compares the
    per-volume timings the metadata records (source read, which holds the signing, and total)."""
    import contextlib
    import io

    import preprocess_volume
    from dinov3_cache.paths import VolumePaths
    from dinov3_cache.records import read_json

    signing = cellmap_source.sign_reads
    runs: dict[bool, list[dict]] = {True: [], False: []}

    def extract(sign: bool) -> dict:
        out = work / f"extraction_{len(runs[True]) + len(runs[False])}_{sign}"  # a new cache each run
        cellmap_source.sign_reads = signing if sign else (lambda arrays, pieces, snapshot: {})
        args = ["--volume-index", *map(str, range(volumes)), "--output-dir", str(out), "--data-root", str(root),
                "--organelles", "mito", "--model-id", "random:tiny", "--device", "cpu", "--output-image-dim", "32",
                "--base-resolution", "128", "--min-resolution-for-raw", "32"]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert preprocess_volume.main(args) == 0
        finally:
            cellmap_source.sign_reads = signing
        timings = [read_json(VolumePaths(out, i).metadata)["timing"] for i in range(volumes)]
        return {key: sum(t[key] for t in timings) for key in ("source_read_seconds", "total_seconds")}

    extract(True)  # warm: page cache, model construction
    for repeat in range(repeats):
        for sign in (False, True) if repeat % 2 else (True, False):  # alternating: neither pays for going first
            runs[sign].append(extract(sign))
    print(f"extraction, local zarr, {volumes} volumes per run (random:tiny, CPU, output 32, raw 128^3), medians of {repeats} runs:")
    for key, what in (("source_read_seconds", "source read"), ("total_seconds", "total")):
        with_, without = (statistics.median(r[key] for r in runs[sign]) for sign in (True, False))
        print(f"  {what:11}: without signatures {without:.3f} s, with {with_:.3f} s; ratio with / without: {with_ / without:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="local files only (no moto_server)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--extraction", action="store_true", help="also time preprocess_volume.py with and without signing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        root = Path(work) / "data"
        build_dataset(root)
        measure("local zarr", CellMapSource(prepare_catalog(str(root), None, None, Storage())), args.volumes, args.repeats)
        if args.extraction:
            measure_extraction(root, Path(work), args.volumes, args.repeats)
        if not args.no_s3:
            from tests.conftest import s3_server_holding

            with s3_server_holding(root, DATASET) as endpoint:
                storage = Storage(S3Options(endpoint=endpoint))
                catalog = prepare_catalog("s3://cellmap-test/data", None, None, storage)
                measure(f"S3 (moto_server at {endpoint})", CellMapSource(catalog, storage), args.volumes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
