#!/usr/bin/env python
"""Extract DINOv3 features for one volume and commit it to the cache.

    python preprocess_volume.py --volume-index 0 --output-dir OUT --source synthetic --model-id random:tiny
    python preprocess_volume.py --settings OUT/logs/submissions/settings_STAMP.json --volume-index 0

Options come from the command line, else from --settings (the file a submission writes),
else from the defaults.
Exit status (docs/exit-status.md): 0 complete or skipped, 1 failed, 2 bad options (nothing
done), 3 another run holds this volume, 143 terminated (SIGTERM).
"""

import argparse
import logging
import sys

from dinov3_cache.errors import CacheToolError, OneLineParser, report_error
from dinov3_cache.extraction.settings import add_extraction_arguments, apply_settings_file, read_settings_file, settings_from_args
from dinov3_cache.indices import check_index


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume-index", type=int, required=True, help="volume index (also the random seed)")
    parser.add_argument("--settings", default=None, metavar="FILE",
                        help="extraction settings written by submit_preprocessing_jobs.py; options given here win")
    add_extraction_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line > settings file > defaults: the file's values become the parser's defaults."""
    parser = build_parser()
    settings_only = argparse.ArgumentParser(add_help=False)
    settings_only.add_argument("--settings", default=None)
    known, _ = settings_only.parse_known_args(argv)
    if known.settings is not None:
        apply_settings_file(parser, read_settings_file(known.settings))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_index(args.volume_index)
        config = settings_from_args(args).config(args.volume_index)
    except CacheToolError as e:  # bad options or settings: nothing was done
        return report_error(e)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    # torch loads here, once the options are known to be good (--help and bad options stay fast)
    from dinov3_cache.extraction.commit import keep_running_on_sigterm
    from dinov3_cache.extraction.pipeline import Terminated, preprocess_volume, raise_on_sigterm
    from dinov3_cache.layout import VolumeLocked
    from dinov3_cache.sources.base import source_from_args

    raise_on_sigterm()
    try:
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
    keep_running_on_sigterm()  # the volume is complete: a late SIGTERM must not turn that into 143
    print(outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
