#!/usr/bin/env python
"""PyTorch Dataset / DataLoader over a DINOv3 feature cache, and a loading benchmark.

    from preprocessed_dataloader import create_preprocessed_dataloader
    loader = create_preprocessed_dataloader("/path/to/cache", batch_size=4, shuffle=True)
    for features, gt, mask in loader:   # (B, C, D, H, W), (B, D, H, W), (B, D, H, W) or None
        ...

Benchmark: python preprocessed_dataloader.py --preprocessed-dir DIR --batch-size 4 --num-batches 20
"""

import sys

from dinov3_cache.interrupt import ctrl_c_exits_at_once, run_script

with ctrl_c_exits_at_once(__name__):  # torch loads here (seconds): Ctrl-C meanwhile is one line, exit 130
    from dinov3_cache.loader.buffers import collate_samples
    from dinov3_cache.loader.dataloader import PreprocessedDataLoader, create_preprocessed_dataloader
    from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset
    from dinov3_cache.loader.volumes import CacheError, VolumeReadError

__all__ = [
    "PreprocessedDINOv3Dataset",
    "PreprocessedDataLoader",
    "create_preprocessed_dataloader",
    "collate_samples",
    "CacheError",
    "VolumeReadError",
    "main",
]


def main(argv=None) -> int:
    from dinov3_cache.loader.benchmark import main as benchmark_main

    return benchmark_main(argv)


if __name__ == "__main__":
    sys.exit(run_script(main))
