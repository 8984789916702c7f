"""dinov3_cache.records: atomic JSON writes, the canonical spelling, status records."""

from __future__ import annotations

import json
import os

from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import canonical_json, read_json, read_status, write_json_atomic, write_status


def test_an_atomic_write_leaves_the_document_and_no_temporary_file(tmp_path):
    path = tmp_path / "deeper" / "record.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    write_json_atomic(path, {"b": 2})
    assert read_json(path) == {"b": 2}
    assert os.listdir(path.parent) == ["record.json"]
    assert path.read_text().endswith("}\n")


def test_the_written_key_order_is_kept_and_canonical_json_sorts(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"z": 1, "a": 2})
    assert list(json.loads(path.read_text())) == ["z", "a"]
    assert canonical_json({"z": 1, "a": [1, {"c": 2, "b": 3}]}) == '{"a":[1,{"b":3,"c":2}],"z":1}'


def test_a_status_record_keeps_this_process_fields_and_drops_another_process(tmp_path, monkeypatch):
    paths = VolumePaths(tmp_path, 3)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("LSB_JOBID", "77")
    monkeypatch.setenv("LSB_JOBINDEX", "4")
    write_status(paths, "running", started="then")
    record = write_status(paths, "complete", finished="now")
    assert read_status(paths) == record
    assert (record["state"], record["started"], record["finished"]) == ("complete", "then", "now")
    assert (record["volume_index"], record["pid"], record["job_id"]) == (3, os.getpid(), "77[4]")

    write_json_atomic(paths.status, {**record, "pid": os.getpid() + 1, "left_by_another": True})
    assert "left_by_another" not in write_status(paths, "running")


def test_a_missing_or_torn_status_record_reads_as_none(tmp_path):
    paths = VolumePaths(tmp_path, 0)
    assert read_status(paths) is None
    paths.logs.mkdir()
    paths.status.write_text('{"state": "run')
    assert read_status(paths) is None
