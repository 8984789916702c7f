#!/usr/bin/env python
"""The audit report (no verification) over a directory of thousands of small volumes,
timed against `du -s` over the same directory in the same run.

    python -m benchmarks.bench_audit                 # 2,000 volumes, 5 alternating rounds

How the directory is made: one tiny volume is extracted by the real pipeline
(preprocess_volume.py, random-weight model, 16^3 labels), then copied under 2,000
indices; each copy gets its own metadata (index, name, paths, timestamp, resealed digest)
and a 'complete' status record, as a finished job leaves them. 1% of the indices are
failed jobs instead (status 'failed' and a SLURM out-of-memory log), 0.5% are debris of
killed runs, and a submission record expects them all. Both commands run warm (page
cache filled by a first untimed run of each); medians of the timed rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dinov3_cache.cluster.submissions import write_submission_record
from dinov3_cache.paths import ARRAY_NAMES, VolumePaths
from dinov3_cache.records import read_json, write_json_atomic
from dinov3_cache.schema import seal_metadata

REPO = Path(__file__).resolve().parents[1]

OOM_LOG = (
    "INFO volume {i}: 16/48 slices\n"
    "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=9001_{i}.batch. "
    "Some of your processes may have been killed by the cgroup out-of-memory handler.\n"
)


def build_template(work: Path, chunks: str | None) -> Path:
    template = work / "template"
    cmd = [
        sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", "0", "--output-dir", str(template),
        "--source", "synthetic", "--model-id", "random:tiny", "--output-image-dim", "16",
    ] + (["--chunks", chunks] if chunks else [])
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return template


def replicate(template: Path, out: Path, count: int) -> dict:
    """`count` volumes copied from the template's volume 0, each with its own metadata."""
    source = VolumePaths(template, 0)
    metadata = read_json(source.metadata)
    arrays = [a for a in ARRAY_NAMES if source.array(a).is_dir()]
    failed = set(range(50, count, 100))
    partial = set(range(75, count, 200))
    for i in range(count):
        paths = VolumePaths(out, i)
        if i in failed:
            write_json_atomic(paths.status, {"volume_index": i, "state": "failed", "host": "node1", "pid": 1,
                                             "job_id": f"9001_{i}", "error": "killed"})
            paths.log_err.write_text(OOM_LOG.format(i=i))
            continue
        if i in partial:
            shutil.copytree(source.array("features"), paths.staged_array("features"))
            continue
        for a in arrays:
            shutil.copytree(source.array(a), paths.array(a))
        copy = {k: v for k, v in metadata.items() if k != "metadata_digest"}
        copy.update(volume_index=i, volume_name=paths.name,
                    paths={a: str(paths.array(a)) for a in arrays},
                    timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - (count - i) * 3)))
        with open(paths.metadata, "w") as f:  # plain writes: fsync per file would only slow the set-up
            json.dump(seal_metadata(copy), f, indent=2)
        paths.logs.mkdir(exist_ok=True)
        with open(paths.status, "w") as f:
            json.dump({"volume_index": i, "state": "complete", "host": "node1", "job_id": f"9001_{i}"}, f, indent=2)
    write_submission_record(out, {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - count * 3 - 60)),
                                  "indices": list(range(count)), "scheduler": "slurm", "job_ids": ["9001"], "options": {}})
    return {"volumes": count, "failed": len(failed), "partial": len(partial - failed)}


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def count_files(root: Path) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(root))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work-dir", default=None, help="where to build the directory (default: a temporary one)")
    parser.add_argument("--chunks", default=None, help="feature chunks of the template volume (default: the core's)")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_audit_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        template = build_template(work, args.chunks)
        out = work / "cache"
        shutil.rmtree(out, ignore_errors=True)
        made = replicate(template, out, args.volumes)
        print(f"built {made} in {time.perf_counter() - t:.1f} s: {count_files(out)} files and directories under {out}")

        audit = [sys.executable, str(REPO / "check_preprocessing.py"), "--output-dir", str(out)]
        commands = {
            "du -s": ["du", "-s", str(out)],
            "report (text)": audit,
            "report (--json)": audit + ["--json"],
            "report (--storage recorded)": audit + ["--storage", "recorded"],
            "python -c pass (start only)": [sys.executable, "-c", "pass"],
        }
        for cmd in commands.values():  # warm the page cache and the interpreter's files
            timed(cmd)
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                wall, cpu = timed(cmd)
                walls[name].append(wall)
                cpus[name].append(cpu)
        du_wall, du_cpu = statistics.median(walls["du -s"]), statistics.median(cpus["du -s"])
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; medians of {args.rounds} alternating rounds")
        print(f"  {'command':<30} {'wall s':>8} {'x du':>6}   {'cpu s':>7} {'x du':>6}")
        for name in commands:
            wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
            print(f"  {name:<30} {wall:8.3f} {wall / du_wall:6.2f}   {cpu:7.3f} {cpu / max(du_cpu, 1e-3):6.2f}")
        ratio = statistics.median(walls["report (text)"]) / du_wall
        print(f"report / du -s (wall) = {ratio:.2f} (target <= 2): {'met' if ratio <= 2 else 'NOT met'}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
