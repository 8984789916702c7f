#!/usr/bin/env python
"""Extract DINOv3 features for one volume and commit it to the cache.

    python preprocess_volume.py --volume-index 0 --output-dir OUT --source synthetic --model-id random:tiny

Exit status: 0 complete or skipped, 1 failed, 3 another run holds this volume, 143 terminated (SIGTERM).
"""

import argparse
import logging
import sys

from cache_layout import VolumeLocked
from dinov3_model import ModelError
from dinov3_preprocessing import PreprocessingError, Terminated, config_from_args, preprocess_volume, raise_on_sigterm
from preprocess_options import add_extraction_arguments
from volume_sources import SourceError, source_from_args
from zarr_arrays import StorageError

EXIT_FAILED = 1
EXIT_LOCKED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        return EXIT_LOCKED
    except (PreprocessingError, ModelError, SourceError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
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
