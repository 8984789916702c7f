"""The GPU benchmarks run: benchmarks/gpu_session.sh --smoke runs every step of the GPU session
at toy sizes on the CPU (each script's own --smoke, or small arguments), so a typo or a wrong
call shows here and not on a lent GPU's few minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

STEPS = ("bench_gpu_volumes", "bench_bf16_tolerance", "bench_commit_overlap", "bench_tokens_loader", "bench_loader_gpu",
         "bench_bf16_512")


def run_session(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), *args], capture_output=True, text=True,
                          timeout=900, cwd="/", env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})


@pytest.mark.slow
def test_gpu_session_smoke_runs_every_step_to_its_figures(tmp_path):
    result = run_session(tmp_path, "--smoke")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^{step} +\d+ s  ok$", summary, re.MULTILINE), summary
    # what comes back from the GPU machine: at most 8 files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{s}.txt" for s in STEPS] + ["environment.txt", "summary.txt"])
    assert "CUDA available" in (tmp_path / "environment.txt").read_text()

    volumes = (tmp_path / "bench_gpu_volumes.txt").read_text()
    for execution in ("eager", "RoPE tables cached", "compiled"):
        assert re.search(rf"^  {execution} +: +[0-9.]+ slices/s, +[0-9.]+% of matmul rate, .*\(within the bf16 tolerance: True\)$",
                         volumes, re.MULTILINE), volumes
    assert re.search(r"cold \(empty cache\): [0-9.]+ s \(cache hits 0, misses [1-9]", volumes), volumes
    assert re.search(r"warm \(same cache, new process\): [0-9.]+ s \(cache hits [1-9]\d*, misses 0\)", volumes), volumes
    for layout in ("dense", "tokens"):
        assert re.search(rf"layout {layout}: 2 volumes in [0-9.]+ s \(one process\) = [0-9,]+ volumes per GPU-hour", volumes), volumes
    assert "not measured" not in volumes

    assert "worst ratio ours / eager bf16" in (tmp_path / "bench_bf16_tolerance.txt").read_text()
    assert "ratio serial / overlapped" in (tmp_path / "bench_commit_overlap.txt").read_text()
    assert (tmp_path / "bench_tokens_loader.txt").read_text().count("tokens / dense throughput") == 2
    assert re.search(r"loader \(device='cpu'\): [0-9.]+ batches/s", (tmp_path / "bench_loader_gpu.txt").read_text())
    # the summary's key lines reach the end of stdout, all the GPU tool returns
    assert result.stdout.rstrip().endswith(summary.rstrip())


def test_gpu_session_refuses_a_machine_without_cuda_or_an_unknown_option(tmp_path):
    unknown = run_session(tmp_path, "--fast")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: unknown option '--fast'; usage: bash benchmarks/gpu_session.sh [--smoke]"
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    no_gpu = run_session(tmp_path)
    assert no_gpu.returncode == 2
    assert no_gpu.stderr.strip().splitlines()[-1].startswith("error: ") and "sees no CUDA GPU" in no_gpu.stderr
    assert "CUDA available: False" in (tmp_path / "environment.txt").read_text()


def test_token_kernel_benchmark_compares_every_tile_size_with_the_default_and_the_definition():
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_token_kernel", "--smoke", "--tiles-mb", "0.5,4"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for item in ("whole volume", "16^3 crop"):
        for threads in (1, 2):
            assert f"{item}, {threads} thread(s)" in result.stdout
    assert result.stdout.count("(default)") == 4
    assert len(re.findall(r"^ +0\.50 MB +[0-9.]+ +[0-9.]+ +[0-9.]+$", result.stdout, re.MULTILINE)) == 4
    assert result.stdout.count("kernel at the default tile / definition, time:") == 4
