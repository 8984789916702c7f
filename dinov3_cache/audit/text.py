"""The report as text, section by section (the --json form is Report.to_json)."""

from __future__ import annotations

from pathlib import Path

from dinov3_cache.audit.debris import removal_command
from dinov3_cache.audit.report import Report
from dinov3_cache.indices import format_ranges

CONFIG_SHOWN = (
    "model_id", "pretrained", "base_resolution", "min_resolution_for_raw", "output_image_dim", "planes",
    "organelles", "features_dtype", "compression", "zarr_format", "chunks",
)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"


def _index_list(indices: list[int], limit: int = 400) -> str:
    text = format_ranges(indices)
    return text if len(text) <= limit else text[:limit].rsplit(",", 1)[0] + ", ..."


def format_report(report: Report) -> str:
    out: list[str] = []
    add = out.append
    c = report.counts
    add(f"Cache {report.output_dir}  (report of {report.generated})")
    add(f"Expected {c['expected']} volume(s): {report.expected['ranges'] or '-'}  ({report.expected['source']})")
    for warning in report.warnings:
        add(f"WARNING: {warning}")
    add("")
    add("Volumes")
    add(f"  complete      {c['complete']:>6} / {c['expected']}")
    add(f"  missing       {c['missing']:>6}" + (f"   {_index_list(report.missing)}" if report.missing else ""))
    for state, label in (("running", "running"), ("failed", "failed"), ("partial", "partial"), ("not_started", "not started")):
        indices = report.not_started if state == "not_started" else [p["index"] for p in getattr(report, state) if p["state"] == state]
        if indices:
            add(f"    {label:<11} {len(indices):>6}   {_index_list(indices)}")
    if report.outside_expected:
        add(f"  also complete outside the expected set: {len(report.outside_expected)}   {_index_list(report.outside_expected)}")
    for p in report.running[:50]:
        add(f"    running {p['index']}: job {p['job_id'] or '-'} on {p['host'] or '?'} since {p['started'] or '?'}")
    if report.partial:
        add(f"  debris of dead runs ({human_bytes(report.storage['debris_bytes'])}; removed by the next run of the volume, "
            f"or now by: {removal_command(Path(report.output_dir))}):")
        for p in report.partial[:50]:
            add(f"    {p['index']}" + (" (complete)" if p["state"] == "complete" else "") + f": {human_bytes(p['debris_bytes'])}: "
                + ", ".join(Path(d).name for d in p["debris"]))
    format_failures(report, add)
    format_metadata_problems(report, add)
    format_timing(report, add)
    format_storage(report, add)
    format_sources_and_configuration(report, add)
    format_submissions(report, add)
    format_verification(report, add)
    format_source_check(report, add)
    add("")
    add(f"Result: {report.verdict} (exit status {report.exit_status})")
    return "\n".join(out)


def format_failures(report: Report, add) -> None:
    if not report.failed:
        return
    add("")
    add(f"Failures ({len(report.failed)})")
    for p in report.failed[:100]:
        where = " ".join(part for part in (p["job_id"] and f"job {p['job_id']}", p["host"] and f"on {p['host']}") if part)
        job = f" [{where}]" if where else ""  # a run outside any scheduler has a host but no job id
        kill = p.get("kill")
        if kill:
            add(f"  volume {p['index']}{job}: killed: {kill['kind'].replace('_', ' ')} ({kill['scheduler']}): {kill['line']}")
            add(f"      -> {kill['advice']}")
            if p["error"] and p["error"] != kill["line"]:
                add(f"      last error: {p['error']}")
        else:
            add(f"  volume {p['index']}{job}: {p['error'] or 'failed (no error recorded)'}")
        if p["logs"]:
            add(f"      log {', '.join(p['logs'])}" + (f" (last {len(p['log_tail'])} lines):" if p["log_tail"] else ""))
            for line in p["log_tail"]:
                add(f"        | {line[:200]}")
    if len(report.failed) > 100:
        add(f"  ... and {len(report.failed) - 100} more (see --json)")


def format_metadata_problems(report: Report, add) -> None:
    if report.metadata_problems:
        add("")
        add("Metadata problems")
        for p in report.metadata_problems:
            add(f"  volume {p['index']}: {p['problem']}")


def format_timing(report: Report, add) -> None:
    add("")
    if not report.timing:
        add("Timing: no complete volumes")
        return
    n = max(v["count"] for v in report.timing.values())
    add(f"Timing per volume, seconds ({n} complete)      mean   median      min      max")
    for key, v in report.timing.items():
        label = key.removesuffix("_seconds").replace("_", " ")
        add(f"  {label:<38} {v['mean']:>8.2f} {v['median']:>8.2f} {v['min']:>8.2f} {v['max']:>8.2f}")
    t = report.throughput
    if t["volumes_per_hour"]:
        line = f"  throughput {t['volumes_per_hour']:.1f} volumes/hour since {t['since']}"
        if t["estimated_finish"]:
            line += f"; {t['remaining']} left, estimated finish {t['estimated_finish']}"
        add(line)


def format_storage(report: Report, add) -> None:
    s = report.storage
    add("")
    add(f"Storage ({s['method']})")
    add(f"  total {human_bytes(s['total_bytes'])} in {s['volumes']} complete volume(s); per volume {human_bytes(s['per_volume_mean_bytes'])}")
    for name, total in s["by_array_bytes"].items():
        add(f"    {name:<10} {human_bytes(s['by_array_mean_bytes'][name]):>12} per volume   {human_bytes(total):>12} total")
    for layout, group in s.get("by_layout", {}).items():
        add(f"  layout {layout:<7} {group['volumes']:>6} volume(s), {human_bytes(group['per_volume_mean_bytes'])} per volume: "
            f"{group['indices']}")
    if s["debris_bytes"]:
        add(f"  debris of killed runs {human_bytes(s['debris_bytes'])}")
    if s["projected_total_bytes"] is not None:
        add(
            f"  projected for {s['projected_count']} volumes: {human_bytes(s['projected_total_bytes'])}; "
            f"still needed {human_bytes(s['still_needed_bytes'])}; free on this file system {human_bytes(s['free_bytes'])}"
        )
    if s["short_of_space"]:
        add(f"  WARNING: not enough free space: {human_bytes(s['still_needed_bytes'])} needed, {human_bytes(s['free_bytes'])} free")


def format_sources_and_configuration(report: Report, add) -> None:
    if report.sources:
        add("")
        add("Sources (volumes per dataset)")
        for name, n in report.sources.items():
            add(f"  {n:>6}  {name}")
    cfg = report.configuration
    if cfg["fingerprint"] is None:
        return
    add("")
    add(f"Configuration (fingerprint {cfg['fingerprint']}, shared by {cfg['volumes']} volume(s))")
    for key in CONFIG_SHOWN:
        if key in cfg["settings"]:
            add(f"  {key:<24} {cfg['settings'][key]}")
    for group in cfg["differing"]:
        diffs = "; ".join(f"{k}: {v['these']} (majority {v['majority']})" for k, v in list(group["differences"].items())[:6])
        add(
            f"  WARNING: {len(group['indices'])} volume(s) have a different configuration (fingerprint {group['fingerprint']}): "
            f"{_index_list(group['indices'])}" + (f" -- {diffs}" if diffs else "")
        )


def format_submissions(report: Report, add) -> None:
    if not report.submissions:
        return
    add("")
    add(f"Submissions ({len(report.submissions)})")
    for s in report.submissions[-10:]:
        jobs = s["job_ids"]
        jobs_text = ", ".join(map(str, jobs))[:120] if isinstance(jobs, list) else str(jobs)[:120]
        add(f"  {s['submitted']}  {s['scheduler']}  {s['volumes']} volume(s) {s['indices']}  jobs {jobs_text or '-'}")


def format_verification(report: Report, add) -> None:
    v = report.verification
    if v is None:
        return
    add("")
    add(f"Verification ({v['checked']} volume(s), {len(v['failed'])} failed)")
    for check in v["volumes"]:
        if check["ok"]:
            arrays = ", ".join(
                f"{name} {a.get('chunks_checked', 0)} chunks" for name, a in check["arrays"].items()
            )
            add(f"  volume {check['index']}: OK ({arrays}; crc32, files, shapes, NaN/Inf checked in {check['seconds']:.1f} s)")
        else:
            add(f"  volume {check['index']}: FAILED")
            for problem in check["problems"]:
                add(f"    {problem}")
    for preview in report.previews:
        add(f"  preview {preview['index']}: {preview.get('path') or preview.get('skipped')}")


def format_source_check(report: Report, add) -> None:
    from dinov3_cache.audit.source_check import summary_line

    check = report.source_check
    if check is None:
        return
    add("")
    add(f"Sources ({summary_line(check)})")
    for v in check["volumes"]:
        if v["source_status"] in ("stale", "unreachable"):
            add(f"  volume {v['index']}: {v['source_status']}: {v['detail']}")
    unsigned = [v["index"] for v in check["volumes"] if v["source_status"] == "no_signature"]
    if unsigned:
        add(f"  no signature (written before signatures were recorded): {_index_list(unsigned)}")
