#!/usr/bin/env python
"""Extract DINOv3 features for one volume and commit it to the cache.

    python preprocess_volume.py --volume-index 0 --output-dir OUT --source synthetic --model-id random:tiny

Exit status (docs/exit-status.md): 0 complete or skipped, 1 failed, 2 bad options,
3 another run holds this volume, 143 terminated (SIGTERM).
"""

import argparse
import logging
import sys

from dinov3_cache.errors import CacheToolError, OneLineParser, report_error
from dinov3_cache.extraction.options import add_extraction_arguments
from dinov3_cache.extraction.config import config_from_args
from dinov3_cache.extraction.pipeline import Terminated, preprocess_volume, raise_on_sigterm
from dinov3_cache.layout import VolumeLocked
from dinov3_cache.sources.base import source_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume-index", type=int, required=True, help="volume index (also the random seed)")
    add_extraction_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    raise_on_sigterm()
    try:
        config = config_from_args(args)
        outcome = preprocess_volume(config, source_from_args(args))
    except VolumeLocked as e:
        print(f"error: volume {args.volume_index} is being processed by another run ({e}); not starting a second", file=sys.stderr)
        return e.exit_status
    except CacheToolError as e:
        return report_error(e)
    except Terminated as e:
        print(f"error: volume {args.volume_index} {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"error: volume {args.volume_index} interrupted; rerun to finish it", file=sys.stderr)
        return 130
    print(outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
