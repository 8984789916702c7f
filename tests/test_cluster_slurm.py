"""dinov3_cache/cluster/slurm.py: what SLURM prints and sets, parsed by its backend alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinov3_cache.cluster.base import SCHEDULER_LOG_RE, SchedulerError
from dinov3_cache.cluster.jobs import JobSpec, split_arrays
from dinov3_cache.cluster.resources import Resources
from dinov3_cache.cluster.schedulers import base_job_ids, current_job_id, job_element
from dinov3_cache.cluster.slurm import SlurmScheduler

SLURM = SlurmScheduler()


def test_sbatch_parsable_output_gives_the_job_id():
    assert SLURM.parse_submit_output("812\n") == "812"
    assert SLURM.parse_submit_output("sbatch: warning: x\n812;cluster2\n") == "812"
    with pytest.raises(SchedulerError, match="sbatch did not report a job id"):
        SLURM.parse_submit_output("")


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_ARRAY_JOB_ID": "812", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "815"}, "812_3"),
    ({"SLURM_JOB_ID": "815"}, "815"),  # not an array job
    ({}, None),
])
def test_the_job_id_from_the_environment(env, expected):
    assert SlurmScheduler.environment_job_id(env) == expected
    assert current_job_id(env) == expected


def test_element_ids_are_slurm_underscores_only():
    assert SlurmScheduler.job_element("5001_5") == ("5001", 5)
    assert SlurmScheduler.job_element("5001[5]") is None and SlurmScheduler.job_element("5001") is None
    assert job_element("5001_5") == ("5001", 5) and job_element("5001") is None
    assert base_job_ids(["812_3", "812_4", "77[1]", "900"]) == ["77", "812", "900"]


def test_squeue_lines_give_the_living_jobs():
    # squeue -h -o %i -j 812,900: running elements, a pending range with a throttle, a plain job
    assert SLURM.parse_liveness("812_3\n812_[5-7,9%2]\n900\n") == {"812_3", "812_5", "812_6", "812_7", "812_9", "900"}
    assert SLURM.liveness_argv(["812", "900"]) == ["squeue", "-h", "-o", "%i", "-j", "812,900"]


def test_log_file_names_carry_slurm_placeholders_and_parse_back(tmp_path):
    spec = JobSpec("dinov3_preprocess", tmp_path, ("python", "x.py"), tmp_path)
    (array,) = split_arrays(spec, [0, 1], 1000)
    argv = SLURM.render(array, Resources()).argv
    err = Path(next(a for a in argv if a.startswith("--error=")).removeprefix("--error="))
    assert err.name == "dinov3_preprocess_%A_%a.err"
    match = SCHEDULER_LOG_RE.match(err.name.replace("%A", "5001").replace("%a", "5"))
    assert match and (match.group("job"), match.group("element")) == ("5001", "5")


@pytest.mark.parametrize("line, kind", [
    ("slurmstepd: error: Detected 1 oom_kill event in StepId=5.batch.", "out_of_memory"),
    ("slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-11-26T10:00:00 DUE TO TIME LIMIT ***", "walltime"),
    ("slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-11-26T10:00:00 DUE TO PREEMPTION ***", "preempted"),
    ("slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-11-26T10:00:00 DUE TO NODE FAILURE ***", "node_failure"),
    ("slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-11-26T10:00:00 ***", "cancelled"),
])
def test_kill_signatures(line, kind):
    kinds = [s.kind for s in SlurmScheduler.kill_signatures if s.pattern.search(line)]
    assert kinds[:1] == [kind]


def test_liveness_query_that_finds_no_job_is_an_answer(tmp_path, monkeypatch):
    """squeue fails with 'Invalid job id' when none of the asked ids exists: all are gone."""
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert SLURM.can_query_liveness()
    assert SLURM.query_alive(["812"]) == set()
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    assert SLURM.query_alive(["812"]) is None  # no answer: nothing can be concluded
