#!/usr/bin/env python
"""Extract many volumes as job arrays on LSF or SLURM, or as processes on this machine.

    python submit_preprocessing_jobs.py --output-dir OUT --num-volumes 100 [--start-index 0] [options]
    python submit_preprocessing_jobs.py --output-dir OUT --indices 10 15 23-40 [options]
    python submit_preprocessing_jobs.py --output-dir OUT --num-volumes 100 --missing-only [options]
    python submit_preprocessing_jobs.py --output-dir OUT --num-volumes 100 --stale-only --data-root ROOT [options]

Every option of preprocess_volume.py is accepted. The submission writes them once, as
OUT/logs/submissions/settings_STAMP.json, and every job runs
`preprocess_volume.py --settings FILE --volume-index N [N2 ...]` (K indices with --volumes-per-job K).
Exit status (docs/exit-status.md): 0 submitted (local: all complete), 1 a submission or a
local volume failed, 2 bad input (nothing submitted).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dinov3_cache.interrupt import ctrl_c_exits_at_once, run_script

with ctrl_c_exits_at_once(__name__):  # imports take seconds: Ctrl-C meanwhile is one line, exit 130
    from dinov3_cache.cluster.base import SchedulerError
    from dinov3_cache.cluster.jobs import JobSpec, array_ranges, split_arrays
    from dinov3_cache.cluster.resources import add_scheduler_arguments, resources_from_args
    from dinov3_cache.cluster.schedulers import SCHEDULERS, choose_scheduler
    from dinov3_cache.cluster.submissions import settings_file_path, submission_stamp, write_submission_record
    from dinov3_cache.commit_protocol import committed_volume_indices
    from dinov3_cache.directories import directory_problem
    from dinov3_cache.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CacheToolError, OneLineParser, UsageError, report_error
    from dinov3_cache.extraction.preflight import (
        add_preflight_arguments,
        check_existing_configuration,
        check_model,
        check_organelles,
    )
    from dinov3_cache.extraction.settings import (
        ExtractionSettings,
        add_extraction_arguments,
        settings_document,
        settings_from_args,
        write_settings_file,
    )
    from dinov3_cache.extraction.weights import is_random_model_id
    from dinov3_cache.indices import check_index, format_ranges, parse_index_list
    from dinov3_cache.records import now_iso
    from dinov3_cache.sources.registry import source_from_settings, source_type


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_argument_group("which volumes")
    choice = which.add_mutually_exclusive_group(required=True)
    choice.add_argument("--num-volumes", type=int, help="this many consecutive volume indices from --start-index")
    choice.add_argument("--indices", nargs="+", help="volume indices and inclusive ranges, e.g. 10 15 23-40")
    which.add_argument("--start-index", type=int, default=0, help="first index with --num-volumes (default 0)")
    which.add_argument("--missing-only", action="store_true", help="only the indices that have no complete volume")
    which.add_argument(
        "--stale-only", action="store_true",
        help="only the complete volumes whose source changed where their crop was read (as check_preprocessing.py "
             "--check-sources finds), replaced as --overwrite does; with --missing-only, the missing ones too")
    which.add_argument("--volumes-per-job", type=int, default=1, metavar="K",
                       help="volumes run by one process per array element (one model load; the array shrinks K-fold)")
    which.add_argument("--dry-run", action="store_true", help="print the commands and job scripts; submit and create nothing")
    add_scheduler_arguments(parser, sorted(SCHEDULERS))
    add_extraction_arguments(parser)
    add_preflight_arguments(parser)
    return parser


def requested_indices(args: argparse.Namespace) -> list[int]:
    if args.indices is not None:
        return parse_index_list(args.indices)
    if args.num_volumes < 1 or args.start_index < 0:
        raise UsageError("--num-volumes must be at least 1 and --start-index at least 0")
    check_index(args.start_index, "--start-index")
    check_index(args.start_index + args.num_volumes - 1, "--start-index + --num-volumes - 1")
    return list(range(args.start_index, args.start_index + args.num_volumes))


def missing_indices(output_dir: str, indices: list[int]) -> list[int]:
    complete = set(committed_volume_indices(output_dir))  # one listing, whatever the count
    return [i for i in indices if i not in complete]


def stale_indices(args: argparse.Namespace, indices: list[int]) -> list[int]:
    """The complete volumes among indices whose recorded source signature no longer holds."""
    from dinov3_cache.audit.source_check import check_sources, summary_line

    complete = set(committed_volume_indices(args.output_dir))
    check, problems = check_sources(Path(args.output_dir), [i for i in indices if i in complete], vars(args), "--stale-only")
    print(f"stale-only: {summary_line(check)}")
    for problem in problems:
        print(f"note: volume {problem['index']} is not resubmitted: {problem['problem']}")
    return [v["index"] for v in check["volumes"] if v["source_status"] == "stale"]


def selected_indices(args: argparse.Namespace, requested: list[int]) -> list[int]:
    """--missing-only and --stale-only (together: either); else every requested index."""
    if not (args.missing_only or args.stale_only):
        return requested
    chosen: set[int] = set()
    if args.missing_only:
        missing = missing_indices(args.output_dir, requested)
        print(f"missing-only: {len(missing)} of {len(requested)} volumes have no complete volume"
              + (f": {format_ranges(missing)}" if missing else ""))
        chosen.update(missing)
    if args.stale_only:
        stale = stale_indices(args, requested)
        print(f"stale-only: {len(stale)} of {len(requested)} volumes have a changed source"
              + (f": {format_ranges(stale)}; they are replaced (the old volume stays readable until the new one commits)" if stale else ""))
        chosen.update(stale)
        args.overwrite = args.overwrite or bool(stale)  # a stale volume is complete: only an overwrite replaces it
    return sorted(chosen)


def checked_settings(args: argparse.Namespace, indices: list[int], prepare_source: bool) -> ExtractionSettings:
    """Refuse options that would make every job fail before submitting thousands of jobs
    (preflight.py: no weights are loaded), and prepare the source once (a data root's
    catalog is built here and saved for every job to read)."""
    settings = settings_from_args(args)
    config = settings.config(indices[0])
    if not args.skip_model_check:
        check_model(config)
    if is_random_model_id(config.model_id):  # the jobs warn in their logs only: say it once here
        print(f"note: model {config.model_id} has RANDOM weights (not pretrained): features are for testing the pipeline only")
    # a dry run creates nothing: a source that writes when built (a data root's catalog) is built only when submitting
    if prepare_source or not source_type(vars(args)).writes_when_built:
        source = source_from_settings(vars(args))
        check_organelles(config, source)
        if not config.overwrite:
            note = check_existing_configuration(config, source, indices)
            if note:
                print(note)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if directory_problem(args.output_dir):  # before '' becomes the current directory
        return report_error(UsageError(f"--output-dir {directory_problem(args.output_dir)}"))
    args.output_dir = str(Path(args.output_dir).absolute())  # jobs may start in another directory
    try:
        requested = requested_indices(args)
        scheduler, reason = choose_scheduler(args.scheduler, len(requested))
        print(f"scheduler: {scheduler.name} ({reason})")
        resources = resources_from_args(args)
        scheduler.check_resources(resources)
        stamp = submission_stamp()
        # every value that reaches a job script or a scheduler command line is checked here
        spec = JobSpec.preprocess_volume(Path(args.output_dir), settings_file_path(args.output_dir, stamp), args.job_name)
    except CacheToolError as e:
        report_error(e)
        return EXIT_USAGE  # every error so far is bad input: nothing was submitted

    try:
        indices = selected_indices(args, requested)
    except CacheToolError as e:
        report_error(e)
        return EXIT_USAGE  # nothing was submitted
    if not indices:
        print("nothing to submit")
        return EXIT_OK

    try:
        settings = checked_settings(args, indices, prepare_source=not args.dry_run)
    except CacheToolError as e:
        report_error(e)
        return EXIT_USAGE

    settings_file = settings_file_path(args.output_dir, stamp)
    try:
        arrays = split_arrays(spec, indices, args.max_array_size if scheduler.max_array_size else None, args.volumes_per_job)
    except CacheToolError as e:
        return report_error(e)
    if len(arrays) > 1:
        what = f"{len(indices)} volumes" if args.volumes_per_job == 1 else f"{sum(a.size for a in arrays)} jobs of {args.volumes_per_job} volumes"
        print(f"{what} exceed the array size limit of {args.max_array_size}: split into {len(arrays)} arrays")
    rendered = [scheduler.render(array, resources) for array in arrays]

    if args.dry_run:
        print(f"# settings file {settings_file} (written at submission):")
        print(json.dumps(settings_document(settings), indent=2))
        for r in rendered:
            print(r.printable())
        print(f"dry run: {len(indices)} volumes in {sum(r.array.size for r in rendered)} job(s), {len(rendered)} array(s); "
              "nothing submitted or created")
        return EXIT_OK
    return submit(args, scheduler, rendered, resources, settings, stamp)


def submit(args, scheduler, rendered, resources, settings: ExtractionSettings, stamp: str) -> int:
    try:
        scheduler.check_installed()
    except SchedulerError as e:
        report_error(e)
        return EXIT_USAGE  # nothing was submitted
    try:
        scheduler.prepare_directories(Path(args.output_dir))
        write_settings_file(settings_file_path(args.output_dir, stamp), settings)
    except OSError as e:
        print(f"error: cannot write the log directories under {args.output_dir} ({e.strerror}); choose a writable --output-dir", file=sys.stderr)
        return EXIT_FAILED
    submitted, error = [], None
    for r in rendered:
        try:
            scheduler.submit(r)
        except SchedulerError as e:
            error = e
            break
        submitted.append(r)
        jobs = f" in {r.array.size} jobs" if r.array.volumes_per_job > 1 else ""
        print(f"submitted {r.job_id}: {len(r.array.volume_indices)} volumes{jobs} ({array_ranges(r.array.volume_indices)})")
    if submitted:
        record = write_submission_record(args.output_dir, {
            "submitted": now_iso(),
            "indices": [i for r in submitted for i in r.array.volume_indices],
            "scheduler": scheduler.name,
            "job_ids": [r.job_id for r in submitted],
            "options": vars(args),
            "command": [sys.executable, *sys.argv],
            "job_command": list(rendered[0].array.spec.volume_argv("{volume_index}")),
            "resources": resources.to_record(),
            "arrays": [r.to_record() for r in submitted],
            "settings_file": str(settings_file_path(args.output_dir, stamp)),
        }, stamp)
        print(f"recorded in {record}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    status = scheduler.run_submitted(resources, progress=sys.stderr.isatty())  # a backend that runs them here
    if status is not None:
        return status
    print(f"watch: {scheduler.watch_command([r.job_id for r in submitted])}")
    print(f"progress: python check_preprocessing.py --output-dir {args.output_dir}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_script(main))
