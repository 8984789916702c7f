"""dinov3_cache/cluster/lsf.py: what LSF prints and sets, parsed by its backend alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinov3_cache.cluster.base import SCHEDULER_LOG_RE, SchedulerError
from dinov3_cache.cluster.jobs import JobSpec, split_arrays
from dinov3_cache.cluster.lsf import LsfScheduler
from dinov3_cache.cluster.resources import Resources
from dinov3_cache.cluster.schedulers import current_job_id, job_element

LSF = LsfScheduler()


def test_bsub_output_gives_the_job_id():
    assert LSF.parse_submit_output("Job <4711> is submitted to queue <normal>.\n") == "4711"
    with pytest.raises(SchedulerError, match="bsub did not report a job id"):
        LSF.parse_submit_output("Request aborted by esub. Job not submitted.\n")


@pytest.mark.parametrize("env, expected", [
    ({"LSB_JOBID": "77", "LSB_JOBINDEX": "3"}, "77[3]"),
    ({"LSB_JOBID": "77", "LSB_JOBINDEX": "0"}, "77"),  # not an array job
    ({"LSB_JOBID": "77"}, "77"),
    ({"LSB_JOBINDEX": "3"}, None),
    ({}, None),
])
def test_the_job_id_from_the_environment(env, expected):
    assert LsfScheduler.environment_job_id(env) == expected
    assert current_job_id(env) == expected  # the process-wide answer asks this backend


def test_element_ids_are_lsf_brackets_only():
    assert LsfScheduler.job_element("7001[6]") == ("7001", 6)
    assert LsfScheduler.job_element("7001_6") is None and LsfScheduler.job_element("7001") is None
    assert LsfScheduler.job_element(None) is None
    assert job_element("7001[6]") == ("7001", 6)


def test_bjobs_lines_give_the_living_jobs():
    # bjobs -noheader -o 'jobid jobindex stat' 77 78: an element running, one finished, a plain job pending
    assert LSF.parse_liveness("77 1 RUN\n77 2 EXIT\n78 0 PEND\n79 - DONE\nJob <80> is not found\n") == {"77[1]", "78"}
    assert LSF.liveness_argv(["77", "78"]) == ["bjobs", "-noheader", "-o", "jobid jobindex stat", "77", "78"]


def test_log_file_names_carry_lsf_placeholders_and_parse_back(tmp_path):
    spec = JobSpec("dinov3_preprocess", tmp_path, ("python", "x.py"), tmp_path)
    (array,) = split_arrays(spec, [0, 1], 1000)
    argv = LSF.render(array, Resources()).argv
    out = Path(argv[argv.index("-o") + 1])
    assert out.name == "dinov3_preprocess_%J_%I.out"
    filled = out.name.replace("%J", "4711").replace("%I", "2")
    match = SCHEDULER_LOG_RE.match(filled)
    assert match and (match.group("job"), match.group("element")) == ("4711", "2")


@pytest.mark.parametrize("line, kind", [
    ("TERM_MEMLIMIT: job killed after reaching LSF memory usage limit.", "out_of_memory"),
    ("TERM_RUNLIMIT: job killed after reaching LSF run time limit.", "walltime"),
    ("TERM_PREEMPT: job killed after preemption.", "preempted"),
    ("TERM_OWNER: job killed by owner.", "cancelled"),
])
def test_kill_signatures(line, kind):
    kinds = [s.kind for s in LsfScheduler.kill_signatures if s.pattern.search(line)]
    assert kinds[:1] == [kind] and all(s.scheduler == "LSF" for s in LsfScheduler.kill_signatures)
