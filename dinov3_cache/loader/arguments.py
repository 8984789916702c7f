"""Checks of the loader's Python arguments, made when a dataset or loader is built: each bad
value is one `LoaderArgumentError` naming the argument and what to pass instead, never a
traceback from deep inside the first batch. Also the machine bounds: worker processes and
threads beyond what the machine has, and a loader whose batches in flight would not fit in
memory."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from dinov3_cache.directories import directory_problem
from dinov3_cache.errors import EXIT_USAGE
from dinov3_cache.loader.volumes import CacheError
from dinov3_cache.storage.dtypes import TORCH_DTYPES

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
THREADS_PER_CORE = 8  # read threads wait on I/O more than they compute: a few per core pay off
WORKER_BASELINE_BYTES = 250 * 2**20  # a process that imported the loader: 243 MiB resident (157 MiB its own), measured
DEVICE_TYPES = ("cpu", "cuda")


class LoaderArgumentError(CacheError, ValueError):
    """A bad argument of a dataset or loader; the message names it and what to pass."""

    exit_status = EXIT_USAGE


def positive_int(value, name: str, minimum: int = 1) -> int:
    """An integer (not a bool, string or float) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LoaderArgumentError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); write e.g. {name}={max(minimum, 1)}")
    if value < minimum:
        raise LoaderArgumentError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def cache_directory(path, name: str = "preprocessed_dir") -> Path:
    """A path (str or os.PathLike), not empty, not a file."""
    if not isinstance(path, (str, os.PathLike)):
        raise LoaderArgumentError(f"{name} must be a path (str or pathlib.Path), got {path!r} ({type(path).__name__})")
    problem = directory_problem(path)
    if problem:
        raise LoaderArgumentError(f"{name} {problem} (the --output-dir used for extraction)")
    return Path(path)


def volume_index_list(indices) -> list[int] | None:
    """None (every committed volume) or a non-empty list of integers."""
    if indices is None:
        return None
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        example = f"[{indices}]" if isinstance(indices, numbers.Integral) else "[0, 1, 2] or list(range(0, 3))"
        got = f"the string {indices!r}" if isinstance(indices, (str, bytes)) else repr(indices)
        raise LoaderArgumentError(f"volume_indices must be a list of integers, got {got}; write e.g. volume_indices={example}")
    values = list(indices)
    if not values:
        raise LoaderArgumentError("volume_indices is empty; pass at least one index, or None for every committed volume")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise LoaderArgumentError(
                f"volume_indices holds {value!r}, not an integer; write integers, e.g. volume_indices=list(range(0, 3)) for 0-2"
            )
    return [int(v) for v in values]


def crop_shape(crop_size) -> tuple[int, int, int] | None:
    """None, one integer edge (a cube), or three positive integers (d, h, w)."""
    if crop_size is None:
        return None
    if isinstance(crop_size, numbers.Integral) and not isinstance(crop_size, bool):
        crop_size = (crop_size,) * 3
    if isinstance(crop_size, (str, bytes)) or not hasattr(crop_size, "__len__") or len(crop_size) != 3 or not all(
        isinstance(c, numbers.Integral) and not isinstance(c, bool) and c > 0 for c in crop_size
    ):
        raise LoaderArgumentError(f"crop_size needs one positive integer edge or 3 positive integers (d, h, w), got {crop_size!r}")
    return tuple(int(c) for c in crop_size)


def dtype_argument(dtype, name: str, floating_only: bool) -> torch.dtype | None:
    """None, a torch dtype, or its name ('float32', 'torch.float16'); features must be floating."""
    if dtype is None:
        return None
    allowed = FLOAT_DTYPES if floating_only else tuple(TORCH_DTYPES)
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in allowed:
            raise LoaderArgumentError(f"{name} {dtype!r} is not one of {', '.join(allowed)} (or None for the stored dtype)")
        return TORCH_DTYPES[key]
    if not isinstance(dtype, torch.dtype):
        raise LoaderArgumentError(f"{name} must be a torch dtype or its name, e.g. torch.float32 or 'float32', got {dtype!r}")
    if floating_only and not dtype.is_floating_point:
        raise LoaderArgumentError(
            f"{name} must be a floating dtype ({', '.join(FLOAT_DTYPES)}), got {dtype}: features would be truncated to integers"
        )
    return dtype


def device_argument(device) -> torch.device | None:
    """None, or a cpu / cuda device that this machine has."""
    if device is None:
        return None
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise LoaderArgumentError(f"device {device!r} is not supported; use None, 'cpu', 'cuda' or 'cuda:N'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LoaderArgumentError(f"device={device} asked for, but no CUDA GPU is visible; use device=None or 'cpu'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise LoaderArgumentError(f"device={device} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return parsed


def sample_index(index) -> int:
    """A dataset index: an integer (negative counts from the end is not supported)."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        hint = "; read several with a DataLoader or [dataset[i] for i in range(...)]" if isinstance(index, slice) else ""
        raise LoaderArgumentError(f"dataset indices are integers, got {index!r} ({type(index).__name__}){hint}")
    return int(index)


# ----------------------------------------------------------------------------- machine bounds


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    return THREADS_PER_CORE * cpu_count()


def bounded_threads(num_threads: int) -> int:
    """num_threads, capped (with a warning) at THREADS_PER_CORE per CPU core of this machine."""
    limit = max_threads()
    if num_threads > limit:
        warnings.warn(f"num_threads={num_threads} capped at {limit} ({THREADS_PER_CORE} per CPU core of this machine)", stacklevel=3)
        return limit
    return num_threads


def bounded_workers(num_workers: int) -> int:
    """num_workers, capped (with a warning) at the CPU cores of this machine."""
    limit = cpu_count()
    if num_workers > limit:
        warnings.warn(f"num_workers={num_workers} capped at {limit}, the CPU cores of this machine", stacklevel=3)
        return limit
    return num_workers


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def sample_nbytes(volume, crop: Sequence[int] | None, features_dtype: torch.dtype | None) -> int:
    """Bytes of one sample as a batch holds it (features in the delivered dtype, labels, mask)."""
    shape = volume.features_shape
    voxels = math.prod(crop if crop is not None else shape[1:])
    item = 4 if features_dtype is None else torch.empty((), dtype=features_dtype).element_size()
    return voxels * (shape[0] * item + 8 + 1)


def check_loader_memory(dataset, batch_size: int, num_workers: int, prefetch_factor: int | None, prefetch_batches: int) -> None:
    """Refuse a loader whose batches in flight (workers x prefetch x batch bytes, plus each
    worker's own memory) exceed the memory available now: it would swap the machine to a halt."""
    available = available_memory()
    if available is None or not dataset.volumes:
        return
    largest = max(sample_nbytes(v, dataset.crop_size, dataset.features_dtype) for v in dataset.volumes)
    batch = batch_size * largest
    in_flight = (num_workers * (prefetch_factor or 2) if num_workers else 1) + prefetch_batches + 1
    needed = in_flight * batch + num_workers * WORKER_BASELINE_BYTES
    if needed > available:
        raise LoaderArgumentError(
            f"the loader would need about {needed / 2**30:.1f} GiB ({in_flight} batches of {batch / 2**30:.2f} GiB in flight"
            f"{f', {num_workers} workers' if num_workers else ''}) but {available / 2**30:.1f} GiB is available; "
            "lower num_workers, batch_size or prefetch_batches, or use crop_size"
        )
