#!/usr/bin/env python
"""Extract DINOv3 features for one volume, or several in one process, and commit them to the cache.

    python preprocess_volume.py --volume-index 0 --output-dir OUT --source synthetic --model-id random:tiny
    python preprocess_volume.py --settings OUT/logs/submissions/settings_STAMP.json --volume-index 3 7 10-19

Options come from the command line, else from --settings (the file a submission writes),
else from the defaults.
Several volumes share one model load; each keeps its own lock and status record, and one
failed volume does not stop the others.
Exit status (docs/exit-status.md): 0 every volume complete or skipped, 1 a volume failed, 2 bad
options (nothing done), 3 another run holds a volume (and none failed), 143 terminated (SIGTERM).
"""

import argparse
import logging
import sys

from dinov3_cache.interrupt import ctrl_c_exits_at_once, run_script

with ctrl_c_exits_at_once(__name__):  # imports take seconds: Ctrl-C meanwhile is one line, exit 130
    from dinov3_cache.errors import (
        EXIT_INTERRUPTED,
        CacheToolError,
        OneLineParser,
        UsageError,
        exit_status_for_signal,
        first_line,
        report_error,
    )
    from dinov3_cache.extraction.preflight import check_model
    from dinov3_cache.extraction.settings import (
        add_extraction_arguments,
        apply_settings_file,
        read_settings_file,
        settings_from_args,
    )
    from dinov3_cache.indices import format_ranges, parse_index_list
    from dinov3_cache.sources.base import source_name_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume-index", nargs="+", required=True, metavar="INDEX",
                        help="volume indices and inclusive ranges, e.g. 3 7 10-19 (each index is also the volume's seed)")
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
        settings = settings_from_args(args)
        indices = parse_index_list(args.volume_index, "--volume-index")
        configs = [settings.config(index) for index in indices]
        source_name_from_args(args)
        check_model(configs[0])  # a model no run could load fails here, before any output exists
    except CacheToolError as e:  # bad options or settings: nothing was done
        return report_error(UsageError(first_line(e)))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True)
    # torch loads here, once the options are known to be good (--help and bad options stay fast)
    with ctrl_c_exits_at_once(__name__):
        from dinov3_cache.extraction.model import ExecutionOptions
        from dinov3_cache.extraction.multi import exit_status, preprocess_volumes, summary_line
        from dinov3_cache.extraction.signals import Terminated, ignore_late_signals, raise_on_sigterm
        from dinov3_cache.sources.base import source_from_args

    raise_on_sigterm()
    which = f"volume {indices[0]}" if len(indices) == 1 else f"volumes {format_ranges(indices)}"
    try:
        source = source_from_args(args)  # its errors (data that cannot be read) keep their status
    except CacheToolError as e:
        return report_error(e)
    try:
        check_before_model_load(configs[0], source)
    except CacheToolError as e:  # bad options found before the model loads: nothing was done
        return report_error(UsageError(first_line(e)))
    try:
        execution = ExecutionOptions(settings.compile, settings.compile_cache_dir())
        results = preprocess_volumes(configs, source, execution, lambda result: report(result, several=len(configs) > 1))
    except CacheToolError as e:
        return report_error(e)
    except Terminated as e:
        print(f"error: {which}: {e}", file=sys.stderr)
        return exit_status_for_signal(e.signum)
    except KeyboardInterrupt:
        print(f"error: {which}: interrupted; rerun to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    ignore_late_signals(as_script=__name__ == "__main__")  # every volume is done: a late signal must not change that
    if len(results) > 1:
        print(summary_line(results))
    return exit_status(results)


def check_before_model_load(config, source) -> None:
    """What would otherwise fail once the model has loaded (and leave a 'failed' record): the
    device and the organelles (the model itself was checked with the options)."""
    from dinov3_cache.extraction.model import resolve_device
    from dinov3_cache.extraction.preflight import check_organelles

    resolve_device(config.device)
    check_organelles(config, source)


def report(result, several: bool) -> None:
    """One line per volume as it finishes: stdout when it succeeded, an error line otherwise."""
    if result.succeeded:
        print(result.message, flush=True)
    elif result.state == "failed" and several:
        print(f"error: volume {result.volume_index}: {result.message}", file=sys.stderr, flush=True)
    else:
        print(f"error: {result.message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(run_script(main))
