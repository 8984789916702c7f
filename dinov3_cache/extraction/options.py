"""Command-line options of one volume's extraction, defined once.

`preprocess_volume.py` parses them; `submit_preprocessing_jobs.py` accepts the same
options and passes them through unchanged with `extraction_argv`.
"""

from __future__ import annotations

import argparse

from dinov3_cache.sources.cellmap import add_cellmap_arguments
from dinov3_cache.zarr_arrays import COMPRESSIONS, DEFAULT_FEATURE_CHUNKS, ZARR_FORMATS

DEFAULT_MODEL_ID = "facebook/dinov3-vitl16-pretrain-sat493m"
PLANES = ("xy", "xz", "yz")
FEATURE_DTYPES = ("float16", "bfloat16", "float32")

# dests of the options that travel from the submission script to every job
_PASS_THROUGH: list[str] = []


def add_pass_through(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add an extraction option that every submitted job receives as given."""
    action = parser.add_argument(*flags, **kwargs)
    if action.dest not in _PASS_THROUGH:
        _PASS_THROUGH.append(action.dest)


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of a volume's extraction except --volume-index."""

    def add(*flags: str, **kwargs) -> None:
        add_pass_through(parser, *flags, **kwargs)

    add("--output-dir", required=True, help="cache directory (created if missing)")
    add(
        "--source", default=None,
        help="where crops come from: 'cellmap' (implied by --data-root / --catalog) or 'synthetic' (built-in, offline demo data)",
    )
    add("--organelles", nargs="+", default=["cell"], help="label names; one keeps instance ids, several become classes")
    add("--base-resolution", type=float, default=128.0, help="label voxel size in nm (default 128)")
    add("--min-resolution-for-raw", type=float, default=32.0, help="raw voxel size in nm (default 32)")
    add("--output-image-dim", type=int, default=128, help="label voxels per axis (default 128)")
    add("--inference-filter", nargs="*", default=[], help="datasets whose inference labels are used")
    add("--crop-filter", nargs="*", default=[], help="only these ground-truth crops")
    add("--min-label-fraction", type=float, default=0.01)
    add("--min-unique-ids", type=int, default=2)
    add("--min-ground-truth-fraction", type=float, default=0.05)
    add("--no-gt-extension", action="store_true", help="keep crops inside the annotated box (no mask written)")
    add(
        "--compression", nargs="?", const="lz4", default="none", choices=COMPRESSIONS,
        help="chunk compression; the bare flag means lz4 (default none)",
    )
    add("--num-threads", type=int, default=8, help="TensorStore I/O and copy threads (default 8)")
    add(
        "--model-id", default=DEFAULT_MODEL_ID,
        help="Hugging Face id or local directory of a DINOv3 ViT; 'random:tiny' builds an offline demo model",
    )
    add("--model-revision", default=None, help="hub revision (branch, tag or commit) of --model-id")
    add("--planes", nargs="+", default=list(PLANES), choices=PLANES, help="slicing planes, averaged (default all)")
    add("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    add("--features-dtype", default="float16", choices=FEATURE_DTYPES)
    add(
        "--chunks", default=",".join(map(str, DEFAULT_FEATURE_CHUNKS)),
        help="feature chunk shape 'C,Z,Y,X' (default %(default)s)",
    )
    add("--zarr-format", type=int, default=2, choices=ZARR_FORMATS, help="2 (default) or 3 (sharded, crc32c)")
    add("--save-raw", action="store_true", help="also write volume_XXXXXX_raw.zarr at slice resolution")
    add("--overwrite", action="store_true", help="replace a complete volume (the old one stays valid until then)")
    add("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    add_cellmap_arguments(parser, add_pass_through)


def extraction_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Rebuild the extraction options of `args` as argv, for a job's command line."""
    argv: list[str] = []
    for action in parser._actions:
        if action.dest not in _PASS_THROUGH or not action.option_strings:
            continue
        value = getattr(args, action.dest)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            if value or action.nargs == "*":
                argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
