"""One audit from the command line's options: check every option before any work, gather
the report, verify and preview the chosen volumes, print the report once on stdout (text
or JSON), and return the exit status."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from dinov3_cache.audit.report import Report, finish_report, gather_report
from dinov3_cache.audit.scan import AuditError
from dinov3_cache.audit.text import format_report
from dinov3_cache.directories import directory_problem
from dinov3_cache.errors import EXIT_OK, CacheToolError, first_line, report_error
from dinov3_cache.indices import check_index, parse_index_list


@dataclass(frozen=True)
class AuditOptions:
    output_dir: Path
    expected: list[int] | None  # None: every recorded submission's indices
    log_lines: int
    storage: str  # measured | recorded
    verify_sample: bool  # verify a random sample of sample_size complete volumes
    sample_size: int
    verify_indices: list[int] | None
    verify_all: bool
    seed: int | None
    num_threads: int
    preview_dir: Path | None
    as_json: bool

    @property
    def verifies(self) -> bool:
        return self.verify_sample or bool(self.verify_indices) or self.verify_all


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
    if args.num_volumes:
        check_index(start, "--start-index")
        check_index(start + args.num_volumes - 1, "--start-index + --num-volumes - 1")
    return list(range(start, start + args.num_volumes))


def check_output_dir(output_dir: str) -> None:
    problem = directory_problem(output_dir)
    if problem:
        raise AuditError(f"--output-dir {problem}")


def check_preview_dir(preview_dir: Path) -> None:
    """The preview directory must be one this user can write or create: found out before
    any verification, not after minutes of reading."""
    if preview_dir.exists() and not preview_dir.is_dir():
        raise AuditError(f"--preview {preview_dir} is a file; pass a directory for the preview images")
    existing = preview_dir.absolute()
    while not existing.exists():  # where the directory would be created
        existing = existing.parent
    if not existing.is_dir():
        raise AuditError(f"--preview {preview_dir} cannot be created: {existing} is a file; pass a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AuditError(f"--preview {preview_dir}: {existing} is not writable by this user; pass a directory you can write")


def options_from_args(args: argparse.Namespace) -> AuditOptions:
    if args.sample_size < 0 or args.num_threads <= 0 or args.log_lines < 0:
        raise AuditError("--sample-size and --log-lines must be >= 0 and --num-threads > 0")
    verify_indices = parse_index_list(args.verify_indices, "--verify-indices") if args.verify_indices else None
    preview_dir = Path(args.preview) if args.preview else None
    if preview_dir is not None:
        check_preview_dir(preview_dir)
    return AuditOptions(
        output_dir=Path(args.output_dir),
        expected=expected_from_args(args),
        log_lines=args.log_lines,
        storage=args.storage,
        # --preview alone previews a sample
        verify_sample=args.verify or (preview_dir is not None and not verify_indices and not args.verify_all),
        sample_size=args.sample_size,
        verify_indices=verify_indices,
        verify_all=args.verify_all,
        seed=args.seed,
        num_threads=args.num_threads,
        preview_dir=preview_dir,
        as_json=args.json,
    )


def verify_and_preview(options: AuditOptions, report: Report) -> list:
    """Verify the chosen volumes; preview those that verified (a damaged one gets none)."""
    from dinov3_cache.audit.verify import choose_volumes_to_verify, verify_volume  # numpy, TensorStore

    absent = report_not_complete(report, options.verify_indices or [])
    chosen = choose_volumes_to_verify(
        report.complete, options.sample_size if options.verify_sample else 0,
        [i for i in options.verify_indices or [] if i not in absent], options.verify_all, options.seed,
    )
    checks = [verify_volume(options.output_dir, index, options.num_threads) for index in chosen]
    if options.preview_dir is not None:
        from dinov3_cache.audit.previews import write_preview

        for check in checks:
            if check.ok:
                try:
                    path = write_preview(options.output_dir, check.index, options.preview_dir, options.num_threads)
                except OSError as e:  # a full disk, a directory removed meanwhile
                    raise CacheToolError(
                        f"cannot write the preview of volume {check.index} in {options.preview_dir} ({e.strerror or e}); "
                        "free space there or pass another --preview directory"
                    ) from None
                report.previews.append({"index": check.index, "path": str(path)})
            else:
                report.previews.append({"index": check.index, "skipped": "verification failed; no preview"})
    return checks


def check_report_sources(report: Report, output_dir: Path, args: argparse.Namespace) -> None:
    """--check-sources: each complete volume against its source; a malformed signature is damage."""
    from dinov3_cache.audit.source_check import check_sources

    damaged = {p["index"] for p in report.metadata_problems}  # reported already: not read again
    report.source_check, problems = check_sources(output_dir, [i for i in report.complete if i not in damaged], vars(args))
    report.metadata_problems += problems


def report_not_complete(report: Report, verify_indices: list[int]) -> set[int]:
    """--verify-indices naming volumes that are not complete: they have nothing to verify, so
    they count as missing (exit 1), not as damaged (exit 4)."""
    absent = set(verify_indices) - set(report.complete)
    unlisted = sorted(absent - set(report.missing))
    if unlisted:
        report.missing = sorted(report.missing + unlisted)
        report.counts["missing"] += len(unlisted)
    return absent


def print_report(report: Report, as_json: bool) -> None:
    try:
        print(report.to_json() if as_json else format_report(report), flush=True)
    except BrokenPipeError:  # piped into head: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_audit(args: argparse.Namespace) -> int:
    """The whole audit for check_preprocessing.py's parsed arguments; its exit status."""
    try:
        check_output_dir(args.output_dir)  # '' would audit the current directory
        if getattr(args, "view", None) is not None:
            return run_view(args)
        if getattr(args, "remove_debris", False):
            return run_remove_debris(Path(args.output_dir))
        options = options_from_args(args)
        report = gather_report(options.output_dir, options.expected, options.log_lines, options.storage)
        if getattr(args, "check_sources", False):
            check_report_sources(report, options.output_dir, args)
        checks = verify_and_preview(options, report) if options.verifies else None
    except CacheToolError as e:
        return report_error(e)
    finish_report(report, checks)
    print_report(report, options.as_json)
    return report.exit_status


def run_view(args: argparse.Namespace) -> int:
    """--view INDEX: serve the volume in neuroglancer, or write its state (--view-state)."""
    from dinov3_cache.audit import view
    from dinov3_cache.audit.view_source import reachable_source_layers

    check_index(args.view, "--view")
    if not args.view_state:  # the state file only names the address; serving binds it
        check_bind_address(args.bind_address)
    output_dir = Path(args.output_dir)
    view.volume_metadata_path(output_dir, args.view)  # a missing volume is an error before the source is read
    source, origin = reachable_source_layers(output_dir, args.view, args)
    if args.view_state:
        features = getattr(args, "view_features", False)
        print(view.write_state(output_dir, args.view, Path(args.view_state), args.bind_address, source, origin, features))
        return EXIT_OK
    view.serve(view.open_viewer(output_dir, args.view, args.bind_address, source))
    return EXIT_OK


def check_bind_address(address: str) -> None:
    """An address this machine can serve on, found before neuroglancer starts."""
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.bind(sockaddr)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or first_line(e)
        raise AuditError(
            f"--bind-address {address} cannot be served on here ({reason}); use 127.0.0.1 (this machine) or an address of one of its interfaces"
        ) from None


def run_remove_debris(output_dir: Path) -> int:
    """--remove-debris: remove dead runs' debris (never a live run's), say what went."""
    from dinov3_cache.audit.debris import remove_debris
    from dinov3_cache.audit.text import human_bytes

    if not output_dir.is_dir():
        raise AuditError(f"--output-dir {output_dir} is not a directory; pass the cache directory given to the jobs")
    removed, live, repaired = remove_debris(output_dir)
    for r in removed:
        print(f"removed {r.path} ({human_bytes(r.bytes)})")
    for r in repaired:
        print(f"volume {r.volume_index} is committed: its status record said {r.said}, now complete")
    if live:
        print(f"left alone: volume(s) {', '.join(map(str, live))} (a live run holds them)")
    print(f"removed {len(removed)} debris entries, {human_bytes(sum(r.bytes for r in removed))}")
    return EXIT_OK
