"""A linear probe of a cache's features: what they are worth for the organelles, before the big run.

    python probe_features.py --cache OUT [OUT2 ...] [--train-indices 0-15] [--test-indices 16-19]

    from dinov3_cache.probe import run_probe
    rows = run_probe(["OUT"], train_indices=range(16), test_indices=range(16, 20))

docs/probe.md says what the numbers mean.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dinov3_cache.errors import EXIT_OK, CacheToolError, OneLineParser, report_error
from dinov3_cache.probe.options import DEFAULT_STEPS, ProbeOptions, parse_indices
from dinov3_cache.probe.report import table, write_predictions, write_rows, write_slice_png
from dinov3_cache.probe.run import probe_caches
from dinov3_cache.probe.train import print_progress

__all__ = ["run_probe", "main", "build_parser"]


def run_probe(
    caches: Sequence[str | Path],
    train_indices: Sequence[int] | None = None,
    test_indices: Sequence[int] | None = None,
    crop_size: Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    device: str = "cpu",
    json_path: str | Path | None = None,
    png_path: str | Path | None = None,
    predictions_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 2,
    progress: bool = True,
    print_table: bool = True,
) -> list[dict]:
    """What probe_features.py does, returning the table's rows (the --json document).
    Raises CacheToolError (UsageError for bad input) with one line."""
    options = ProbeOptions(
        caches=tuple(Path(c) for c in caches),
        train_indices=None if train_indices is None else tuple(int(i) for i in train_indices),
        test_indices=None if test_indices is None else tuple(int(i) for i in test_indices),
        crop_size=None if crop_size is None else tuple(crop_size),
        steps=int(steps), batch_size=int(batch_size), seed=int(seed), device=device,
    )
    result = probe_caches(options, print_progress if progress else None)
    if print_table:
        print(table(result), flush=True)
    if json_path is not None:
        write_rows(result, Path(json_path))
    if png_path is not None:
        write_slice_png(result, Path(png_path))
    if predictions_dir is not None:
        write_predictions(result, Path(predictions_dir))
    return result.rows


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="probe_features.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", nargs="+", required=True, metavar="DIR",
                        help="one or more cache directories, probed side by side on the same volumes")
    parser.add_argument("--train-indices", nargs="+", metavar="INDEX",
                        help="training volumes, e.g. 0-15 (default: the committed volumes not tested on)")
    parser.add_argument("--test-indices", nargs="+", metavar="INDEX",
                        help="test volumes, e.g. 16-19 (default: the last quarter of the committed volumes)")
    parser.add_argument("--crop-size", nargs=3, type=int, metavar=("D", "H", "W"),
                        help="training crop (default 32 32 32, or the volume when smaller)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="crops per step (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and the head (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu (default; deterministic), cuda or cuda:N")
    parser.add_argument("--json", metavar="FILE", help="write the table as a JSON list of rows")
    parser.add_argument("--png", metavar="FILE", help="write one test slice: raw, labels, each prediction")
    parser.add_argument("--save-predictions", metavar="DIR", help="write each row's test predictions as .npy files")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_probe(
            args.cache,
            train_indices=parse_indices(args.train_indices, "--train-indices"),
            test_indices=parse_indices(args.test_indices, "--test-indices"),
            crop_size=args.crop_size, steps=args.steps, device=args.device, json_path=args.json,
            png_path=args.png, predictions_dir=args.save_predictions, seed=args.seed, batch_size=args.batch_size,
        )
    except CacheToolError as e:
        return report_error(e)
    return EXIT_OK
