"""dinov3_cache/cluster/local.py and the registry: the local backend has no scheduler ids,
logs or liveness query; the choice of backend and the process-wide questions."""

from __future__ import annotations

import os

import pytest

from dinov3_cache.cluster.jobs import JobSpec, split_arrays
from dinov3_cache.cluster.local import LocalScheduler
from dinov3_cache.cluster.resources import Resources
from dinov3_cache.cluster.schedulers import (
    SCHEDULERS,
    UNNAMED_LOCAL_VOLUMES,
    choose_scheduler,
    current_job_id,
    query_live_jobs,
    scheduler_kill_signatures,
)
from dinov3_cache.errors import UsageError


def test_local_jobs_have_no_scheduler_id_logs_or_liveness_query(tmp_path):
    local = LocalScheduler()
    assert LocalScheduler.environment_job_id({"LOCAL_ARRAY_ELEMENT": "1", "LOCAL_JOB_ID": "local-1-1[1]"}) is None
    assert LocalScheduler.job_element("local-1-1[1]") is None
    assert not local.can_query_liveness() and LocalScheduler.kill_signatures == ()
    spec = JobSpec("dinov3_preprocess", tmp_path, ("python", "x.py"), tmp_path)
    (array,) = split_arrays(spec, [3, 4, 5], None)
    rendered = local.render(array, Resources())
    assert rendered.argv == [] and local.submit(rendered).startswith(f"local-{os.getpid()}-")
    assert local.queued == [rendered]


def test_a_cluster_backend_leaves_running_to_the_scheduler():
    """The submission asks the backend whether it runs the jobs itself (local) or not."""
    for name, backend in SCHEDULERS.items():
        if name != "local":
            assert backend().run_submitted(Resources(), progress=False) is None


def test_the_first_installed_submission_command_chooses_the_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    scheduler, reason = choose_scheduler(None)
    assert scheduler.name == "local" and reason == "neither bsub nor sbatch on PATH"
    assert query_live_jobs(["812_1"]) is None  # no query command installed: no answer
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    scheduler, reason = choose_scheduler(None)
    assert scheduler.name == "slurm" and reason == "sbatch found on PATH"
    assert choose_scheduler("lsf")[0].name == "lsf"


def test_many_volumes_fall_back_to_this_machine_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither bsub nor sbatch
    assert choose_scheduler(None, UNNAMED_LOCAL_VOLUMES)[0].name == "local"
    with pytest.raises(UsageError, match=r"1000 volumes would run on this machine.*pass --scheduler local"):
        choose_scheduler(None, 1000)
    assert choose_scheduler("local", 1000)[0].name == "local"


def test_the_running_job_id_outside_any_scheduler_is_none():
    assert current_job_id({"HOME": "/root"}) is None


def test_every_backends_kill_signatures_are_collected():
    schedulers = {s.scheduler for s in scheduler_kill_signatures()}
    assert schedulers == {"LSF", "SLURM"}


def test_a_volume_stopped_by_ctrl_c_says_so_not_its_last_log_line():
    from dinov3_cache.cluster.local import ElementResult

    stopped = ElementResult(3, -15, 6.0, "WARNING model random:tiny has RANDOM weights", interrupted=True)
    assert stopped.line() == "volume 3: not complete: interrupted by the user (rerun with --missing-only)"
    failed = ElementResult(4, 1, 6.0, "error: something broke")
    assert failed.line() == "volume 4: failed (exit 1): error: something broke"
    assert ElementResult(5, None, 6.0).line().startswith("volume 5: failed (killed at the walltime)")
