#!/usr/bin/env python
"""Report on a feature cache: progress, failures, timing, storage, sources, configuration;
optionally verify volumes byte for byte and write preview images.

    python check_preprocessing.py --output-dir OUT
    python check_preprocessing.py --output-dir OUT --verify --sample-size 5
    python check_preprocessing.py --output-dir OUT --verify-indices 0 1 2 3 4
    python check_preprocessing.py --output-dir OUT --verify-all --json
    python check_preprocessing.py --output-dir OUT --preview PREVIEW_DIR --verify-indices 0 3

Exit status (docs/exit-status.md): 0 every expected volume is complete (and verified,
when asked); 1 an expected volume is not complete; 2 bad arguments; 4 verification
failed or a metadata file is unreadable.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dinov3_cache.audit.report import (
    AuditError,
    choose_volumes_to_verify,
    finish_report,
    format_report,
    gather_report,
    verify_volume,
    write_preview,
)
from dinov3_cache.errors import CacheToolError, OneLineParser, report_error
from dinov3_cache.indices import parse_index_list


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="the cache directory the jobs write to")
    expected = parser.add_argument_group("expected volumes (default: every recorded submission)")
    expected.add_argument("--start-index", type=int, default=None, help="first expected index (with --num-volumes; default 0)")
    expected.add_argument("--num-volumes", type=int, default=None, help="expect START..START+N-1")
    expected.add_argument("--indices", nargs="+", default=None, help="expect these indices, e.g. 0 5 10-99")
    verify = parser.add_argument_group("verification (reads every byte of the chosen volumes)")
    verify.add_argument("--verify", action="store_true", help="verify a random sample of complete volumes")
    verify.add_argument("--sample-size", type=int, default=5, help="volumes in the --verify sample (default 5)")
    verify.add_argument("--verify-indices", nargs="+", default=None, help="verify these volumes (ranges allowed)")
    verify.add_argument("--verify-all", action="store_true", help="verify every complete volume")
    verify.add_argument("--seed", type=int, default=None, help="random seed of the --verify sample")
    verify.add_argument("--num-threads", type=int, default=8, help="TensorStore threads when verifying (default 8)")
    parser.add_argument(
        "--preview", metavar="DIR", default=None,
        help="write DIR/volume_XXXXXX_preview.png for each verified volume (implies --verify when no volumes are chosen)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument("--log-lines", type=int, default=5, help="log lines shown per failed volume (default 5)")
    parser.add_argument(
        "--storage", choices=("measured", "recorded"), default="measured",
        help="'measured' on disk (costs one du, default) or 'recorded' in the metadata at write time (instant)",
    )
    return parser


def expected_from_args(args: argparse.Namespace) -> list[int] | None:
    if args.indices is not None and (args.num_volumes is not None or args.start_index is not None):
        raise AuditError("give either --indices or --start-index/--num-volumes, not both")
    if args.indices is not None:
        return parse_index_list(args.indices)
    if args.num_volumes is None:
        if args.start_index is not None:
            raise AuditError("--start-index needs --num-volumes (how many volumes are expected)")
        return None
    if args.num_volumes < 0 or (args.start_index or 0) < 0:
        raise AuditError("--start-index and --num-volumes must be >= 0")
    start = args.start_index or 0
    return list(range(start, start + args.num_volumes))


def check_args(args: argparse.Namespace) -> None:
    if args.sample_size < 0 or args.num_threads <= 0 or args.log_lines < 0:
        raise AuditError("--sample-size and --log-lines must be >= 0 and --num-threads > 0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        verify_indices = parse_index_list(args.verify_indices, "--verify-indices") if args.verify_indices else None
        report = gather_report(Path(args.output_dir), expected_from_args(args), args.log_lines, args.storage)
    except CacheToolError as e:
        return report_error(e)
    wants_sample = args.verify or (args.preview and not verify_indices and not args.verify_all)
    checks = None
    if wants_sample or verify_indices or args.verify_all:
        chosen = choose_volumes_to_verify(
            report.complete, args.sample_size if wants_sample else 0, verify_indices, args.verify_all, args.seed
        )
        checks = []
        for index in chosen:
            checks.append(verify_volume(Path(args.output_dir), index, args.num_threads))
            if not args.json:
                print(f"verified volume {index}: {'OK' if checks[-1].ok else 'FAILED'}", file=sys.stderr, flush=True)
        if args.preview:
            for check in checks:
                if check.ok:
                    path = write_preview(Path(args.output_dir), check.index, Path(args.preview), args.num_threads)
                    report.previews.append({"index": check.index, "path": str(path)})
                else:
                    report.previews.append({"index": check.index, "skipped": "verification failed; no preview"})
    finish_report(report, checks)
    try:
        print(report.to_json() if args.json else format_report(report), flush=True)
    except BrokenPipeError:  # piped into head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
