"""check_preprocessing.py on real caches built by the core, then damaged in each way a
cache gets damaged: the report text, the JSON, the exit status and the message naming
the volume, array and chunk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
from conftest import call_main, make_chunk_fill_valued, preprocess_args, run_script

from dinov3_cache.audit.joblogs import last_error_line, recognise_kill
from dinov3_cache.audit.png import MARGIN, decode_png
from dinov3_cache.audit.report import EXIT_INCOMPLETE
from dinov3_cache.audit.scan import StorageMeasure, expected_volumes
from dinov3_cache.audit.summaries import read_complete_volumes, storage_summary
from dinov3_cache.cluster.base import SCHEDULER_LOG_RE, scheduler_log_name, scheduler_logs_dir
from dinov3_cache.cluster.schedulers import job_element
from dinov3_cache.cluster.submissions import write_submission_record
from dinov3_cache.disk import bytes_on_disk
from dinov3_cache.errors import EXIT_DAMAGED, EXIT_OK, EXIT_USAGE
from dinov3_cache.paths import VolumePaths, preview_path
from dinov3_cache.records import read_json, write_json_atomic, write_status

SLURM_OOM = (
    "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=5001.batch. "
    "Some of your processes may have been killed by the cgroup out-of-memory handler."
)
SLURM_TIME = "slurmstepd: error: *** JOB 5002 ON node3 CANCELLED AT 2026-11-26T10:00:00 DUE TO TIME LIMIT ***"
LSF_REPORT = """Sender: LSF System <lsfadmin@node7>
Subject: Job 7001[6]: <dinov3_preprocess[6]> in cluster <c> Exited

------------------------------------------------------------

{term}
Exited with exit code {code}.

Resource usage summary:

    CPU time :                                   512.00 sec.
    Max Memory :                                 65536 MB
"""
LSF_RUNLIMIT = "TERM_RUNLIMIT: job killed after reaching LSF run time limit."
LSF_MEMLIMIT = "TERM_MEMLIMIT: job killed after reaching LSF memory usage limit."


def audit(out: Path, *args: str) -> subprocess.CompletedProcess:
    return run_script("check_preprocessing.py", "--output-dir", str(out), *args)


def audit_json(out: Path, *args: str) -> tuple[dict, int]:
    result = audit(out, "--json", *args)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout), result.returncode


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    """A private copy of the 3-volume cache, free to damage."""
    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    return out


@pytest.fixture(scope="module")
def varied_cache(tmp_path_factory, tiny_model_dir) -> Path:
    """Volumes stored every way the core can store them: 0 zarr v2 with several chunks and
    raw saved, 1 zarr v3 sharded, 2 zarr v2 lz4, 3 a different configuration (xy only)."""
    out = tmp_path_factory.mktemp("varied")
    options = {
        0: ["--chunks", "16,8,8,8", "--save-raw"],
        1: ["--zarr-format", "3", "--chunks", "16,4,4,4"],
        2: ["--compression", "lz4", "--chunks", "16,8,8,8"],
        3: ["--planes", "xy"],
    }
    for index, extra in options.items():
        run_script("preprocess_volume.py", *preprocess_args(out, index, tiny_model_dir, *extra), check=True)
    return out


@pytest.fixture
def varied(varied_cache, tmp_path) -> Path:
    out = tmp_path / "varied"
    shutil.copytree(varied_cache, out)
    return out


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    "text, kind, scheduler",
    [
        (SLURM_OOM, "out_of_memory", "SLURM"),
        ("slurmstepd: error: Detected 1 oom_kill event in StepId=11.0. Some of the step tasks have been OOM Killed.", "out_of_memory", "SLURM"),
        ("srun: error: node1: task 0: Out Of Memory", "out_of_memory", "SLURM"),
        (SLURM_TIME, "walltime", "SLURM"),
        ("slurmstepd: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-01T00:00:00 DUE TO PREEMPTION ***", "preempted", "SLURM"),
        ("slurmstepd: error: *** JOB 9 ON n1 CANCELLED AT 2026-01-01T00:00:00 ***", "cancelled", "SLURM"),
        (LSF_REPORT.format(term=LSF_RUNLIMIT, code=140), "walltime", "LSF"),
        (LSF_REPORT.format(term=LSF_MEMLIMIT, code=137), "out_of_memory", "LSF"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "gpu_out_of_memory", "CUDA"),
    ],
)
def test_kill_messages_are_recognised(text, kind, scheduler):
    reason = recognise_kill("INFO loading model\n" + text + "\n")
    found = (reason.kind, reason.scheduler) if reason else None
    assert found == (kind, scheduler), f"recognise_kill gave {found} for {text!r}"


def test_last_error_line_of_a_log():
    traceback = 'INFO start\nTraceback (most recent call last):\n  File "x.py", line 3\nValueError: bad crop\n'
    cases = [
        (traceback, "ValueError: bad crop"),
        ("error: volume 3 failed\nINFO after\n", "error: volume 3 failed"),
        ("INFO volume 3: 48/48 slices\n", None),
    ]
    for text, expected in cases:
        assert last_error_line(text) == expected, f"last_error_line({text!r}) gave {last_error_line(text)!r}"


def test_ordinary_errors_are_not_kills():
    text = "error: volume 3 has an unreadable metadata file\nTraceback (most recent call last):"
    assert recognise_kill(text) is None, f"recognise_kill took an ordinary error for a kill: {recognise_kill(text)}"


def test_expected_volumes_command_line_then_submissions_then_files():
    submissions = [{"indices": [4, 2]}, {"indices": [2, 7]}]
    given = expected_volumes([3, 1, 3], submissions, [0, 9])
    assert given.indices == [1, 3], f"expected_volumes ignored the command line: {given}"
    submitted = expected_volumes(None, submissions, [0, 9])
    assert submitted.indices == [2, 4, 7] and "2 recorded submission" in submitted.source, f"expected_volumes: {submitted}"
    inferred = expected_volumes(None, [], [5, 2])
    assert inferred.indices == list(range(6)), f"expected_volumes did not infer 0..largest: {inferred}"
    assert expected_volumes(None, [], []).indices == [], "expected_volumes found volumes in an empty cache"
    assert expected_volumes([], submissions, [1]).indices == [], "expected_volumes replaced an empty explicit list"


def test_scheduler_log_names_and_job_elements_round_trip():
    name = scheduler_log_name("dinov3_preprocess", "5001", "5", "err")
    match = SCHEDULER_LOG_RE.match(name)
    assert match and (match.group("job"), match.group("element")) == ("5001", "5"), f"SCHEDULER_LOG_RE missed {name}"
    for job_id, expected in (("5001_5", ("5001", 5)), ("7001[6]", ("7001", 6)), ("5001", None), (None, None)):
        assert job_element(job_id) == expected, f"job_element({job_id!r}) gave {job_element(job_id)}"
    assert preview_path(Path("p"), 3) == Path("p/volume_000003_preview.png"), "preview_path"


# ----------------------------------------------------------------------------- the report


def test_complete_cache_reports_every_section_and_exits_zero(cache):
    result = audit(cache)
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    text = result.stdout
    assert "complete           3 / 3" in text
    for section in ("Timing per volume", "feature extraction", "tensorstore write", "Storage (measured with du)",
                    "Sources (volumes per dataset)", "synthetic", "Configuration (fingerprint", "Result: OK"):
        assert section in text, section

    report, rc = audit_json(cache)
    assert rc == EXIT_OK and report["exit_status"] == EXIT_OK
    assert report["counts"]["complete"] == 3 and report["missing"] == []
    assert report["timing"]["total_seconds"]["count"] == 3
    assert report["sources"] == {"synthetic": 3}
    assert report["configuration"]["volumes"] == 3 and report["configuration"]["differing"] == []
    # storage measured on disk, per array and per volume, agrees with a walk of the files
    # (du also counts each array directory's own block, and rounds to KiB)
    walked = sum(bytes_on_disk(p) for i in range(3) for p in VolumePaths(cache, i).existing_arrays())
    assert abs(report["storage"]["total_bytes"] - walked) <= (4096 + 1024) * 9
    assert set(report["storage"]["by_array_bytes"]) == {"features", "gt", "mask"}
    assert set(report["storage"]["per_volume_bytes"]) == {"0", "1", "2"}
    assert report["storage"]["free_bytes"] > 0 and report["storage"]["short_of_space"] is False


def test_storage_without_du_walks_the_files_and_agrees(cache, monkeypatch):
    names = os.listdir(cache)
    with_du = StorageMeasure(cache).result(names)
    monkeypatch.setenv("PATH", "/nonexistent")
    fallback = StorageMeasure(cache)
    walked = fallback.result(names)
    assert fallback.method == "measured by walking the files"
    for name in (VolumePaths(cache, 1).array(a).name for a in ("features", "gt", "mask")):
        assert walked[name] > 0 and abs(with_du[name] - walked[name]) <= 4096 + 1024, name


def test_recorded_storage_needs_no_measurement(cache):
    report, rc = audit_json(cache, "--storage", "recorded")
    assert rc == EXIT_OK
    recorded = sum(read_json(VolumePaths(cache, i).metadata)["storage"]["bytes"]["features"] for i in range(3))
    assert report["storage"]["by_array_bytes"]["features"] == recorded
    assert report["storage"]["method"] == "recorded in metadata at write time"


def test_free_space_shortfall_is_flagged(cache):
    summaries, _, _ = read_complete_volumes(cache, [0, 1, 2])
    for s in summaries:
        s.array_bytes = s.recorded_bytes
    free = shutil.disk_usage(cache).free
    per_volume = sum(summaries[0].array_bytes.values())
    short = storage_summary(cache, summaries, [], free // per_volume + 10, None, "recorded")
    assert short["short_of_space"] and short["still_needed_bytes"] > free, f"storage_summary missed the shortfall: {short}"
    enough = storage_summary(cache, summaries, [], 3, None, "recorded")
    assert not enough["short_of_space"] and enough["still_needed_bytes"] == 0, f"storage_summary: {enough}"
    recorded = sum(sum(s.array_bytes.values()) for s in summaries)
    assert (enough["volumes"], enough["total_bytes"]) == (3, recorded), f"storage_summary totals: {enough}"


def test_gaps_at_both_ends_from_submissions_and_arguments(cache):
    for name in ("features", "gt", "mask"):
        shutil.rmtree(VolumePaths(cache, 0).array(name))
    VolumePaths(cache, 0).metadata.unlink()
    write_submission_record(cache, {"submitted": "2026-11-26T09:00:00+0000", "indices": [0, 1, 2, 3, 4],
                                    "scheduler": "slurm", "job_ids": ["5001"], "options": {}})
    result = audit(cache)
    assert result.returncode == EXIT_INCOMPLETE
    assert "missing            3   0, 3-4" in result.stdout
    assert "from 1 recorded submission(s)" in result.stdout
    assert "slurm  5 volume(s) 0-4  jobs 5001" in result.stdout

    report, rc = audit_json(cache, "--start-index", "1", "--num-volumes", "2")
    assert rc == EXIT_OK and report["missing"] == [] and report["expected"]["source"] == "given on the command line"
    report, rc = audit_json(cache, "--indices", "0-5")
    assert rc == EXIT_INCOMPLETE and report["missing"] == [0, 3, 4, 5] and report["not_started"] == [0, 3, 4, 5]


def test_failed_running_killed_and_partial_volumes(cache, tiny_model_dir):
    """Each state as the jobs of the cluster backends leave it: per-volume logs from the job script,
    the scheduler's own files (where kill notices land) under logs/scheduler/, named
    NAME_JOB_ELEMENT, and submission records that map array elements to volumes."""
    logs, sched = VolumePaths(cache, 0).logs, scheduler_logs_dir(cache)
    sched.mkdir(parents=True)
    slurm = {"job_id": "5001", "indices": list(range(12))}  # element k runs volume k - 1
    lsf = {"job_id": "7001", "indices": [5, 7]}
    write_submission_record(cache, {"submitted": "2026-11-26T09:00:00+0000", "indices": slurm["indices"],
                                    "scheduler": "slurm", "job_ids": ["5001"], "options": {}, "arrays": [slurm]})
    time.sleep(1.1)  # record names carry the second and the pid: a second record in the same second would replace the first
    write_submission_record(cache, {"submitted": "2026-11-26T09:30:00+0000", "indices": lsf["indices"],
                                    "scheduler": "lsf", "job_ids": ["7001"], "options": {}, "arrays": [lsf]})
    # 3: a real failure of the real CLI (no crop passes the label filters), its stderr in the job log
    failing = run_script("preprocess_volume.py", *preprocess_args(cache, 3, tiny_model_dir, "--min-label-fraction", "1.1"))
    assert failing.returncode == 1
    (logs / "volume_000003.err").write_text(failing.stderr)
    # 4: killed by SLURM's OOM handler mid-write: status still 'running', staging debris left behind
    paths4 = VolumePaths(cache, 4)
    write_json_atomic(paths4.status, {"volume_index": 4, "state": "running", "host": "node17", "pid": 4242,
                                      "job_id": "5001_5", "started": "2026-11-26T09:01:00+0000"})
    shutil.copytree(VolumePaths(cache, 1).array("features"), paths4.staged_array("features"))
    (logs / "volume_000004.err").write_text("INFO volume 4: 8/48 slices\n")
    (sched / "dinov3_preprocess_5001_5.err").write_text(SLURM_OOM + "\n")
    # 5, 7: LSF walltime and memory kills (latest submission), 6: SLURM walltime, no status records
    (sched / "dinov3_preprocess_7001_1.out").write_text(LSF_REPORT.format(term=LSF_RUNLIMIT, code=140))
    (sched / "dinov3_preprocess_7001_2.out").write_text(LSF_REPORT.format(term=LSF_MEMLIMIT, code=137))
    (sched / "dinov3_preprocess_5001_6.out").write_text("")  # volume 5's older attempt, no notice
    (sched / "dinov3_preprocess_5001_7.err").write_text(SLURM_TIME + "\n")
    # 8: running right now as job 5002_1, although its previous attempt (5001_9) ran out of memory
    write_status(VolumePaths(cache, 8), "running", started="2026-11-26T09:02:00+0000")
    record = read_json(VolumePaths(cache, 8).status)
    write_json_atomic(VolumePaths(cache, 8).status, {**record, "job_id": "5002_1"})
    (sched / "dinov3_preprocess_5001_9.err").write_text(SLURM_OOM + "\n")
    # 9: 'running' on this host, but its process is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_status(VolumePaths(cache, 9), "running")
    record = read_json(VolumePaths(cache, 9).status)
    write_json_atomic(VolumePaths(cache, 9).status, {**record, "pid": int(gone.stdout)})
    # 10: arrays without metadata, no record at all (killed before anything was logged)
    shutil.copytree(VolumePaths(cache, 1).array("gt"), VolumePaths(cache, 10).array("gt"))

    report, rc = audit_json(cache, "--indices", "0-11")
    assert rc == EXIT_INCOMPLETE and report["exit_status"] == EXIT_INCOMPLETE
    assert report["missing"] == list(range(3, 12))
    assert [p["index"] for p in report["failed"]] == [3, 4, 5, 6, 7, 9]
    assert [p["index"] for p in report["running"]] == [8]
    assert [p["index"] for p in report["partial"]] == [4, 10]
    assert report["not_started"] == [11]
    failed = {p["index"]: p for p in report["failed"]}
    assert "none of 100 candidate crops passed the filters" in failed[3]["error"]
    assert failed[3]["kill"] is None and failed[3]["log_tail"]
    assert (failed[4]["kill"]["kind"], failed[4]["kill"]["scheduler"], failed[4]["job_id"]) == ("out_of_memory", "SLURM", "5001_5")
    assert str(sched / "dinov3_preprocess_5001_5.err") in failed[4]["logs"]
    assert failed[4]["debris"] == [str(paths4.staging)] and failed[4]["debris_bytes"] > 0
    assert (failed[5]["kill"]["kind"], failed[5]["kill"]["scheduler"]) == ("walltime", "LSF")
    assert (failed[6]["kill"]["kind"], failed[6]["kill"]["scheduler"]) == ("walltime", "SLURM")
    assert (failed[7]["kill"]["kind"], failed[7]["kill"]["scheduler"]) == ("out_of_memory", "LSF")
    assert "is gone" in failed[9]["error"]
    assert report["storage"]["debris_bytes"] > 0

    text = audit(cache, "--indices", "0-11").stdout
    assert "failed           6   3-7, 9" in text and "running          1   8" in text
    assert "partial          1   10" in text and "not started      1   11" in text
    assert "volume 4 [job 5001_5 on node17]: killed: out of memory (SLURM): slurmstepd: error: Detected 1 oom-kill" in text
    assert "-> raise --memory-gb" in text and "-> raise --walltime" in text
    assert "volume 3" in text and "| error:" in text  # the log tail
    assert "volume_000004.partial" in text and "volume_000010_gt.zarr" in text


def test_gpu_out_of_memory_from_the_status_record(cache):
    write_status(VolumePaths(cache, 3), "failed", error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    report, rc = audit_json(cache, "--num-volumes", "4")
    assert rc == EXIT_INCOMPLETE
    assert report["failed"][0]["kill"]["kind"] == "gpu_out_of_memory"
    assert "-> lower --batch-size or use a larger GPU" in audit(cache, "--num-volumes", "4").stdout


def test_throughput_and_estimated_finish(cache):
    stamps = [read_json(VolumePaths(cache, i).metadata)["timestamp"] for i in range(3)]
    write_submission_record(cache, {"submitted": min(stamps).replace(stamps[0][11:19], "00:00:00"),
                                    "indices": list(range(6)), "scheduler": "local", "job_ids": [], "options": {}})
    write_status(VolumePaths(cache, 3), "running")
    report, rc = audit_json(cache)
    assert rc == EXIT_INCOMPLETE
    assert report["throughput"]["volumes_per_hour"] > 0
    assert report["throughput"]["remaining"] == 3 and report["throughput"]["estimated_finish"]
    assert "estimated finish" in audit(cache).stdout


def test_configuration_differences_are_warned(varied):
    report, rc = audit_json(varied)
    assert rc == EXIT_OK
    cfg = report["configuration"]
    assert cfg["volumes"] == 3 and len(cfg["differing"]) == 1
    assert cfg["differing"][0]["indices"] == [3] and "planes" in cfg["differing"][0]["differences"]
    assert "WARNING: 1 volume(s) have a different configuration" in audit(varied).stdout


def test_no_expected_volumes_but_complete_ones_found_is_ok(cache, tmp_path):
    result = audit(cache, "--num-volumes", "0")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert "Result: OK: no volumes expected; 3 complete volume(s) found (exit status 0)" in result.stdout
    assert "also complete outside the expected set: 3" in result.stdout and "EMPTY" not in result.stdout
    report, rc = audit_json(cache, "--num-volumes", "0")
    assert rc == EXIT_OK and report["verdict"].startswith("OK:") and report["outside_expected"] == [0, 1, 2]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = audit(empty, "--num-volumes", "0")
    assert nothing.returncode == EXIT_INCOMPLETE and "Result: EMPTY: no volumes expected or found" in nothing.stdout


def test_unreadable_metadata_is_reported_without_verifying(cache):
    path = VolumePaths(cache, 2).metadata
    path.write_bytes(path.read_bytes()[:200])
    result = audit(cache)
    assert result.returncode == EXIT_DAMAGED
    assert "volume 2: metadata file volume_000002_metadata.json is unreadable" in result.stdout


# ----------------------------------------------------------------------------- verification


def verify(out: Path, index: int) -> tuple[dict, str, int]:
    report, rc = audit_json(out, "--verify-indices", str(index))
    check = report["verification"]["volumes"][0]
    assert check["index"] == index
    return check, "\n".join(check["problems"]), rc


def test_intact_volumes_verify(varied):
    report, rc = audit_json(varied, "--verify-all")
    assert rc == EXIT_OK, report["verification"]
    checks = {c["index"]: c for c in report["verification"]["volumes"]}
    assert all(c["ok"] for c in checks.values()) and set(checks) == {0, 1, 2, 3}
    assert checks[0]["arrays"]["features"]["chunks_checked"] == 16  # (32, 16^3) in (16, 8^3) chunks
    assert checks[1]["arrays"]["features"]["chunks_checked"] == 128  # v3: 2 shards of 64 chunks
    assert checks[0]["arrays"]["raw"]["chunks_checked"] == 1
    text = audit(varied, "--verify", "--sample-size", "2", "--seed", "1").stdout
    assert "Verification (2 volume(s), 0 failed)" in text and "OK (features" in text


def test_flipped_byte_in_a_v2_chunk_is_named(varied):
    chunk = VolumePaths(varied, 0).array("features") / "1.0.1.0"
    flip_byte(chunk)
    check, problems, rc = verify(varied, 0)
    assert rc == EXIT_DAMAGED and not check["ok"]
    assert "volume_000000 features: chunk 1.0.1.0 crc32" in problems and str(chunk) in problems
    assert problems.count("crc32") == 1  # only the damaged chunk


def test_flipped_byte_in_labels_and_raw_are_named(varied):
    flip_byte(VolumePaths(varied, 0).array("gt") / "0.0.0")
    flip_byte(VolumePaths(varied, 0).array("raw") / "0.0.0")
    _, problems, rc = verify(varied, 0)
    assert rc == EXIT_DAMAGED
    assert "volume_000000 gt: chunk 0.0.0 crc32" in problems and "volume_000000 raw: chunk 0.0.0 crc32" in problems


def test_deleted_and_truncated_chunks_are_named(varied):
    array = VolumePaths(varied, 0).array("features")
    (array / "0.1.0.1").unlink()
    data = (array / "1.1.1.1").read_bytes()
    (array / "1.1.1.1").write_bytes(data[: len(data) // 3])
    check, problems, rc = verify(varied, 0)
    assert rc == EXIT_DAMAGED
    assert f"chunk file {array / '0.1.0.1'} is missing" in problems
    assert f"chunk file {array / '1.1.1.1'} has {len(data) // 3} bytes, expected {len(data)}" in problems
    assert "chunk 1.1.1.1 cannot be read" in problems


def test_a_chunk_the_writer_skipped_is_not_damage(varied):
    make_chunk_fill_valued(varied, 0, "features", (1, 0, 1, 0))
    assert not (VolumePaths(varied, 0).array("features") / "1.0.1.0").exists()
    check, problems, rc = verify(varied, 0)
    assert rc == EXIT_OK and check["ok"], problems
    assert check["arrays"]["features"]["chunks_checked"] == 15  # no file, nothing to check: its zeros are the fill value


def test_damage_in_a_v3_shard_is_named(varied):
    array = VolumePaths(varied, 1).array("features")
    shards = sorted((array / "c").rglob("*"))
    shard_files = [p for p in shards if p.is_file()]
    assert len(shard_files) == 2
    flip_byte(shard_files[0], 100)
    shard_files[1].unlink()
    _, problems, rc = verify(varied, 1)
    assert rc == EXIT_DAMAGED
    assert f"chunk file {shard_files[1]} is missing" in problems
    assert "volume_000001 features: chunk" in problems and "cannot be read" in problems and str(shard_files[0]) in problems


def test_truncated_v3_shard_is_named(varied):
    shard = next(p for p in sorted((VolumePaths(varied, 1).array("features") / "c").rglob("*")) if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-50])
    _, problems, rc = verify(varied, 1)
    assert rc == EXIT_DAMAGED and "cannot be read" in problems and str(shard) in problems


def test_flipped_byte_in_a_compressed_chunk_is_named(varied):
    chunk = VolumePaths(varied, 2).array("features") / "0.1.1.0"
    flip_byte(chunk, chunk.stat().st_size - 40)
    _, problems, rc = verify(varied, 2)
    assert rc == EXIT_DAMAGED and "volume_000002 features: chunk 0.1.1.0" in problems


def test_edited_metadata_is_named(cache):
    path = VolumePaths(cache, 1).metadata
    metadata = read_json(path)
    metadata["timing"]["total_seconds"] = 0.001  # still valid JSON, still plausible
    write_json_atomic(path, metadata)
    assert audit(cache).returncode == EXIT_OK  # the report alone reads no digests
    _, problems, rc = verify(cache, 1)
    assert rc == EXIT_DAMAGED
    assert f"volume_000001: metadata file {path} was edited after it was written (digest mismatch)" in problems


def test_array_from_another_run_is_named(cache):
    target = VolumePaths(cache, 1).array("gt")
    shutil.rmtree(target)
    shutil.copytree(VolumePaths(cache, 2).array("gt"), target)
    _, problems, rc = verify(cache, 1)
    assert rc == EXIT_DAMAGED and "volume_000001 gt: array was written by another run" in problems


def test_nan_in_features_is_named(cache):
    path = VolumePaths(cache, 2).array("features")
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result()
    store[0, 3, 4, 5] = np.float16("nan")
    _, problems, rc = verify(cache, 2)
    assert rc == EXIT_DAMAGED
    assert "volume_000002 features: chunk 0.0.0.0 holds 1 NaN/Inf values" in problems


def test_missing_array_and_incomplete_volume(cache):
    shutil.rmtree(VolumePaths(cache, 0).array("mask"))
    _, problems, rc = verify(cache, 0)
    assert rc == EXIT_DAMAGED and "volume_000000 mask: array" in problems and "is missing" in problems
    report, rc = audit_json(cache, "--verify-indices", "7")  # not complete: missing, nothing to verify (not damage)
    assert rc == EXIT_INCOMPLETE and 7 in report["missing"] and not report["verification"]["volumes"]


def test_text_report_names_every_damaged_chunk(varied):
    flip_byte(VolumePaths(varied, 0).array("features") / "0.0.0.0")
    result = audit(varied, "--verify-indices", "0", "2")
    assert result.returncode == EXIT_DAMAGED
    assert "Verification (2 volume(s), 1 failed)" in result.stdout
    assert "volume 0: FAILED" in result.stdout and "volume_000000 features: chunk 0.0.0.0 crc32" in result.stdout
    assert "volume 2: OK" in result.stdout and "Result: DAMAGED" in result.stdout


def test_report_lines_are_printed_once_on_stdout_in_order(cache):
    result = audit(cache, "--verify-indices", "0", "2")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stderr == "", f"the audit wrote to stderr: {result.stderr!r}"
    lines = result.stdout.splitlines()
    for index in (0, 2):
        assert sum(f"volume {index}: OK" in line for line in lines) == 1, result.stdout
    order = [next(n for n, line in enumerate(lines) if key in line)
             for key in ("Cache ", "Volumes", "Verification (2 volume(s), 0 failed)", "volume 0: OK", "volume 2: OK", "Result: OK")]
    assert order == sorted(order), result.stdout


# ----------------------------------------------------------------------------- preview


def test_preview_png_per_verified_volume(varied, tmp_path):
    preview = tmp_path / "preview"
    report, rc = audit_json(varied, "--preview", str(preview), "--verify-indices", "0", "1")
    assert rc == EXIT_OK
    written = sorted(p.name for p in preview.iterdir())
    assert written == ["volume_000000_preview.png", "volume_000001_preview.png"]
    with_raw = decode_png((preview / written[0]).read_bytes())
    without_raw = decode_png((preview / written[1]).read_bytes())
    assert with_raw.shape[1] == MARGIN + 4 * (256 + MARGIN)  # features, gt, mask, raw
    assert without_raw.shape[1] == MARGIN + 3 * (256 + MARGIN)
    panel_top = with_raw.shape[0] - MARGIN - 256
    features_panel = with_raw[panel_top:-MARGIN, MARGIN : MARGIN + 256]
    assert len(np.unique(features_panel.reshape(-1, 3), axis=0)) > 50  # PCA colours, not a flat fill
    assert [p["index"] for p in report["previews"]] == [0, 1]


def test_preview_alone_verifies_a_sample_and_skips_damaged(varied, tmp_path):
    for index in (1, 2, 3):
        shutil.rmtree(VolumePaths(varied, index).array("gt"))
    report, rc = audit_json(varied, "--preview", str(tmp_path / "p"), "--sample-size", "4")
    assert rc == EXIT_DAMAGED
    assert report["verification"]["checked"] == 4 and report["verification"]["failed"] == [1, 2, 3]
    assert [p["index"] for p in report["previews"] if "path" in p] == [0]
    assert os.listdir(tmp_path / "p") == ["volume_000000_preview.png"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--indices", "5-2"], "--indices: range '5-2' runs backwards"),
        (["--verify-indices", "x"], "--verify-indices: 'x' is not an index or a range"),
        (["--start-index", "3"], "--start-index needs --num-volumes"),
        (["--indices", "1", "--num-volumes", "3"], "either --indices or"),
        (["--num-threads", "0"], "--num-threads > 0"),
    ],
)
def test_bad_arguments_give_one_line(cache, args, message):
    result = audit(cache, *args)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().startswith("error:") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["existing file", "below a file"])
def test_preview_that_cannot_be_a_directory_gives_one_line_before_any_work(cache, tmp_path, where):
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"not a directory")
    preview = a_file if where == "existing file" else a_file / "previews"
    result = audit(cache, "--preview", str(preview), "--verify-all")
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stdout == "", "the audit did work before rejecting --preview"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --preview {preview}"), result.stderr
    assert a_file.read_bytes() == b"not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_preview_directory_gives_one_line(cache, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = audit(cache, "--preview", str(locked / "previews"))
    assert result.returncode == EXIT_USAGE and result.stdout == ""
    assert result.stderr.strip() == f"error: --preview {locked / 'previews'}: {locked} is not writable by this user; pass a directory you can write"


def test_missing_output_dir_gives_one_line(tmp_path):
    result = audit(tmp_path / "nowhere")
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == f"error: --output-dir {tmp_path / 'nowhere'} is not a directory; pass the cache directory given to the jobs"


def test_unreadable_submission_record_is_a_warning_not_a_crash(cache):
    write_submission_record(cache, {"indices": [0, 1, 2]})
    record = next((cache / "logs" / "submissions").iterdir())
    record.write_text('{"indices": [0, 1')
    result = audit(cache)
    assert result.returncode == EXIT_OK and "Traceback" not in result.stderr
    assert f"WARNING: submission records under {cache / 'logs' / 'submissions'} are unreadable" in result.stdout




HUGE = "99999999999999999999999"


@pytest.mark.parametrize("args, option", [
    (["--start-index", HUGE, "--num-volumes", "2"], "--start-index must be between 0 and 999999"),
    (["--num-volumes", HUGE], "--start-index + --num-volumes - 1 must be between 0 and 999999"),
    (["--indices", HUGE], "--indices must be between 0 and 999999"),
    (["--verify-indices", f"0-{HUGE}"], "--verify-indices must be between 0 and 999999"),
    (["--view", HUGE], "--view must be between 0 and 999999"),
])
def test_huge_indices_are_one_error_line(tmp_path, args, option):
    result = call_main("check_preprocessing", "--output-dir", tmp_path, *args)
    assert result.returncode == 2 and result.stderr.startswith("error:") and option in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if args[0] in ("--start-index", "--num-volumes"):  # the submission's spelling of the same
        submitted = call_main("submit_preprocessing_jobs", "--output-dir", tmp_path / "o", "--scheduler", "local",
                              "--dry-run", "--source", "synthetic", "--skip-model-check", *args)
        assert submitted.returncode == 2 and option in submitted.stderr and not (tmp_path / "o").exists()


def test_debris_of_every_kind_is_listed_and_removed_but_a_live_runs_is_not(tmp_path, built_cache):
    import fcntl

    from dinov3_cache.paths import VolumePaths, temp_path

    out = tmp_path / "cache"
    shutil.copytree(built_cache, out)
    complete, orphan, live = VolumePaths(out, 0), VolumePaths(out, 5), VolumePaths(out, 1)
    (complete.staging / "features.zarr").mkdir(parents=True)
    (complete.staging / "features.zarr" / "c").write_bytes(b"x" * 5000)
    complete.commit_dir("f" * 32).mkdir()
    temp_path(complete.metadata, 999_999_999).write_text("{")
    temp_path(complete.status, 999_999_998).write_text("{")
    (orphan.array("gt") / "zarr.json").parent.mkdir()
    (orphan.array("gt") / "zarr.json").write_text("{}")
    (live.staging / "features.zarr").mkdir(parents=True)
    debris_names = {complete.staging.name, complete.commit_dir("f" * 32).name, orphan.array("gt").name,
                    temp_path(complete.metadata, 999_999_999).name, temp_path(complete.status, 999_999_998).name}

    holder = os.open(live.lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live run of volume 1
    try:
        report = json.loads(call_main("check_preprocessing", "--output-dir", out, "--indices", "0-2", "--json").stdout)
        listed = {Path(d).name: p["index"] for p in report["partial"] for d in p["debris"]}
        assert set(listed) == debris_names and listed[orphan.array("gt").name] == 5
        assert next(p for p in report["partial"] if p["index"] == 0)["debris_bytes"] >= 5000
        text = call_main("check_preprocessing", "--output-dir", out, "--indices", "0-2").stdout
        assert "--remove-debris" in text and "0 (complete)" in text

        removed = call_main("check_preprocessing", "--output-dir", out, "--remove-debris")
        assert removed.returncode == 0, removed.stderr
        assert {Path(line.split()[1]).name for line in removed.stdout.splitlines() if line.startswith("removed /")} == debris_names
        assert "left alone: volume(s) 1" in removed.stdout
        assert live.staging.is_dir()  # the live run's staging area stays
        assert not any((out / n).exists() or (out / "logs" / n).exists() for n in debris_names)
    finally:
        os.close(holder)
    audit = call_main("check_preprocessing", "--output-dir", out, "--indices", "0-2", "--verify-all")
    assert audit.returncode == 0, audit.stdout  # the complete volumes are intact


def test_a_running_volume_whose_job_is_gone_is_reported_failed():
    from dinov3_cache.audit.joblogs import PendingVolume
    from dinov3_cache.audit.live_jobs import mark_vanished_jobs

    def pending():
        return [PendingVolume(0, "running", job_id="812_0"), PendingVolume(1, "running", job_id="812_1"),
                PendingVolume(2, "failed", job_id="812_2"), PendingVolume(3, "running")]

    asked = []
    volumes = pending()
    mark_vanished_jobs(volumes, lambda ids: asked.append(ids) or ("SLURM", {"812_1"}))
    assert asked == [["812_0", "812_1"]]  # one question, for the running volumes with a job id
    assert [v.state for v in volumes] == ["failed", "running", "failed", "running"]
    assert volumes[0].error.startswith("job 812_0 no longer exists in SLURM")
    unanswered = pending()
    mark_vanished_jobs(unanswered, lambda ids: None)  # no scheduler answered: nothing concluded
    assert [v.state for v in unanswered] == ["running", "running", "failed", "running"]
