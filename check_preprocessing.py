#!/usr/bin/env python
"""Report on a feature cache: progress, failures, timing, storage, sources, configuration;
optionally verify volumes byte for byte and write preview images.

    python check_preprocessing.py --output-dir OUT
    python check_preprocessing.py --output-dir OUT --verify --sample-size 5
    python check_preprocessing.py --output-dir OUT --verify-indices 0 1 2 3 4
    python check_preprocessing.py --output-dir OUT --verify-all --json
    python check_preprocessing.py --output-dir OUT --preview PREVIEW_DIR --verify-indices 0 3
    python check_preprocessing.py --output-dir OUT --remove-debris
    python check_preprocessing.py --output-dir OUT --check-sources --data-root ROOT   (has the source changed?)
    python check_preprocessing.py --output-dir OUT --view 3            (neuroglancer; pip install neuroglancer)
    python check_preprocessing.py --output-dir OUT --view 3 --data-root ROOT   (and the source crop)
    python check_preprocessing.py --output-dir OUT --view 3 --view-state state.json --view-features

Exit status (docs/exit-status.md): 0 every expected volume is complete (and verified,
when asked); 1 an expected volume is not complete; 2 bad arguments; 4 verification
failed or a metadata file is unreadable; 5 --check-sources found a volume whose source
changed; 6 --check-sources found a volume whose source cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from dinov3_cache.interrupt import ctrl_c_exits_at_once, run_script

with ctrl_c_exits_at_once(__name__):  # imports take seconds: Ctrl-C meanwhile is one line, exit 130
    from dinov3_cache.audit.run import run_audit
    from dinov3_cache.errors import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    from dinov3_cache.sources.registry import add_data_location_arguments

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
    sources = parser.add_argument_group("source check (reads source metadata and the chunks the crops touched)")
    sources.add_argument(
        "--check-sources", action="store_true",
        help="compare each complete volume's recorded source signature with its source now: current, stale, unreachable or no_signature",
    )
    add_data_location_arguments(sources, "with --view (also shows the source crop) or --check-sources: ")  # as the source declares them
    view = parser.add_argument_group("viewer (neuroglancer, an optional dependency)")
    view.add_argument("--view", type=int, metavar="INDEX", default=None, help="open volume INDEX in neuroglancer, print the URL and serve until stopped")
    view.add_argument(
        "--view-state", metavar="FILE", default=None,
        help="with --view: write the viewer state JSON to FILE instead (arrays read from OUTPUT_DIR served at http://BIND:8000)",
    )
    view.add_argument("--bind-address", default="127.0.0.1", help="address the viewer serves on (default 127.0.0.1)")
    view.add_argument(
        "--view-features", action="store_true",
        help="with --view-state: also write OUTPUT_DIR/volume_XXXXXX_preview.zarr (the features' PCA as uint8 RGB) and a features layer reading it",
    )
    parser.add_argument(
        "--remove-debris", action="store_true",
        help="remove the debris of dead runs (staging areas, stale commit directories, orphan arrays, temporary files) and exit",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument("--log-lines", type=int, default=5, help="log lines shown per failed volume (default 5)")
    parser.add_argument(
        "--storage", choices=("measured", "recorded"), default="measured",
        help="'measured' on disk (costs one du, default) or 'recorded' in the metadata at write time (instant)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_audit(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_script(main))
