"""Several volumes per process, the cached RoPE tables, the attention kernel and the
persistent compilation cache: the features stay those of the eager transformers model."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorstore as ts
import torch
from conftest import REPO, call_main, preprocess_args

from dinov3_cache.extraction.model import FEATURE_TOLERANCE, CachedRopeTables, load_model
from dinov3_cache.locks import VolumeLock
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json


def features(paths: VolumePaths) -> np.ndarray:
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(paths.array("features"))}}).result().read().result()


def test_forward_matches_the_eager_transformers_model(tiny_model_dir):
    """float32 on a CPU: the cached tables are the module's own, so the output is identical;
    a second image size gets its own tables."""
    from transformers import DINOv3ViTModel

    from dinov3_cache.extraction.model import features_match

    reference = DINOv3ViTModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert isinstance(loaded.model.rope_embeddings, CachedRopeTables)
    assert loaded.execution == {"attention": "sdpa", "rope_tables": "cached per image size", "compiled": False}
    torch.manual_seed(0)
    with torch.inference_mode():
        for size in (64, 32, 64):
            x = torch.randn(3, 3, size, size)
            got = loaded.model(pixel_values=x).last_hidden_state
            want = reference(pixel_values=x).last_hidden_state
            assert features_match(got, want, torch.float32)
    assert len(loaded.model.rope_embeddings.tables) == 2


def test_bf16_forward_is_within_the_bf16_tolerance(tiny_model_dir):
    """bf16 weights and activations on a CPU, as on a GPU: our execution is within the bf16 tolerance
    of the eager model in float32 and in bf16, and no farther from float32 than the eager bf16 model.
    Attention is sharpened so that token positions matter, as in a trained model (random weights
    attend almost uniformly): RoPE tables of the wrong image size fail it."""
    from transformers import DINOv3ViTModel

    from benchmarks.bench_bf16_tolerance import sharpen_attention
    from dinov3_cache.extraction.model import feature_difference, features_match

    truth, eager = (DINOv3ViTModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval() for _ in range(2))
    ours = load_model(str(tiny_model_dir), device="cpu").model
    for model in (truth, eager, ours):
        sharpen_attention(model, 8)
    for model in (eager, ours):
        model.to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.inference_mode():
        for size in (32, 64, 32):  # a second size after the first: its own tables
            x = torch.randn(3, 3, size, size)
            want = truth(pixel_values=x).last_hidden_state
            got, eager_got = (m(pixel_values=x.bfloat16()).last_hidden_state for m in (ours, eager))
            assert features_match(got, want, torch.bfloat16, eager=eager_got), feature_difference(got, want)
            assert features_match(got, eager_got, torch.bfloat16)
            assert feature_difference(got, want)["rms_relative"] > 0  # bf16 did round: not a float32 forward


def test_several_volumes_in_one_process(tmp_path, tiny_model_dir):
    """Volumes 0-3 in one run: 2 is held by another run, 3 has a different configuration
    (refused without --overwrite), 0 and 1 commit with the single-volume features; the run
    says 1 and records per volume."""
    single = tmp_path / "single"
    call_main("preprocess_volume", *preprocess_args(single, 1, tiny_model_dir), check=True)
    out = tmp_path / "many"
    call_main("preprocess_volume", *preprocess_args(out, 3, tiny_model_dir, "--planes", "xy"), check=True)
    args = preprocess_args(out, 0, tiny_model_dir)
    args[1] = "0-3"
    with VolumeLock(VolumePaths(out, 2)):
        result = call_main("preprocess_volume", *args)
    assert result.returncode == 1, result.stderr
    assert "volumes: 4 done here: 2 complete, 0 skipped, 1 failed, 1 locked" in result.stdout
    assert "error: volume 3:" in result.stderr and "volume 2 is being processed by another run" in result.stderr
    for index in (0, 1):
        assert read_json(VolumePaths(out, index).status)["state"] == "complete"
    assert read_json(VolumePaths(out, 3).metadata)["configuration"]["planes"] == ["xy"]  # refused, left as it was
    assert not VolumePaths(out, 2).metadata.exists() and not VolumePaths(out, 2).status.exists()
    np.testing.assert_array_equal(features(VolumePaths(out, 1)), features(VolumePaths(single, 1)))
    metadata = read_json(VolumePaths(out, 0).metadata)
    assert metadata["configuration"]["execution"]["attention"] == "sdpa"
    assert metadata["timing"]["model_load_seconds"] > 0
    assert read_json(VolumePaths(out, 1).metadata)["timing"]["model_load_seconds"] == 0  # loaded once

    again = call_main("preprocess_volume", *args[:1], "0-2", *args[2:])  # 0, 1 skipped, 2 free now
    assert again.returncode == 0, again.stderr
    assert "2 skipped" in again.stdout and "1 complete" in again.stdout


def test_only_locked_volumes_exit_3(tmp_path, tiny_model_dir):
    args = preprocess_args(tmp_path, 0, tiny_model_dir)
    args[1] = "0-1"
    with VolumeLock(VolumePaths(tmp_path, 0)):
        result = call_main("preprocess_volume", *args)
    assert result.returncode == 3, result.stderr
    assert VolumePaths(tmp_path, 1).metadata.exists()


COMPILE_PROBE = """
import json, sys, time
import torch
from dinov3_cache.extraction.model import ExecutionOptions, compile_cache_counts, load_model
loaded = load_model(sys.argv[1], device="cpu", execution=ExecutionOptions(compile=True, compile_cache=sys.argv[2]))
eager = load_model(sys.argv[1], device="cpu")
x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    got = loaded.model(pixel_values=x).last_hidden_state
    want = eager.model(pixel_values=x).last_hidden_state
print(json.dumps({**compile_cache_counts(), "difference": (got - want).abs().max().item(), "execution": loaded.execution}))
"""


@pytest.mark.slow
def test_a_second_process_reuses_the_compile_cache(tmp_path, tiny_model_dir):
    """The first process compiles into the cache directory; the second loads every graph from it."""
    def probe() -> dict:
        result = subprocess.run([sys.executable, "-c", COMPILE_PROBE, str(tiny_model_dir), str(tmp_path / "cache")],
                                capture_output=True, text=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    first, second = probe(), probe()
    assert first["misses"] > 0 and first["hits"] == 0
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert first["execution"]["compiled"] is True
    assert max(first["difference"], second["difference"]) <= FEATURE_TOLERANCE["float32"]


# ----------------------------------------------------------------------------- commits overlap the next volume


def run_in_process(out, model_dir, indices: str, overlap_commits: bool = True, report=lambda result: None):
    """preprocess_volumes as preprocess_volume.py calls it, on the tiny geometry."""
    import preprocess_volume
    from dinov3_cache.extraction.multi import preprocess_volumes
    from dinov3_cache.extraction.settings import settings_from_args
    from dinov3_cache.indices import parse_index_list
    from dinov3_cache.sources.base import source_from_args

    args = preprocess_volume.parse_args([str(a) for a in preprocess_args(out, 0, model_dir)])
    settings = settings_from_args(args)
    configs = [settings.config(i) for i in parse_index_list(indices)]
    return preprocess_volumes(configs, source_from_args(args), report=report, overlap_commits=overlap_commits)


class CommitProbe:
    """Records, for each volume's commit, the thread it ran on and whether the next volume's
    extraction had started by then (waiting up to `wait` seconds for it; volumes 0..last)."""

    def __init__(self, monkeypatch, wait: float, last: int = 2):
        from dinov3_cache.extraction import pipeline

        self.computing: dict[int, threading.Event] = collections.defaultdict(threading.Event)
        self.commits: dict[int, tuple[bool, str]] = {}
        real_write, real_commit = pipeline.write_features, pipeline.commit_volume

        def write_features(loaded, crop, config, *rest):
            self.computing[config.volume_index].set()
            return real_write(loaded, crop, config, *rest)

        def commit_volume(paths, commit_id, metadata):
            # the last volume has no next one to wait for
            next_started = self.computing[paths.volume_index + 1].wait(timeout=wait if paths.volume_index < last else 0)
            self.commits[paths.volume_index] = (next_started, threading.current_thread().name)
            return real_commit(paths, commit_id, metadata)

        monkeypatch.setattr(pipeline, "write_features", write_features)
        monkeypatch.setattr(pipeline, "commit_volume", commit_volume)


def test_each_commit_overlaps_the_next_volumes_extraction(tmp_path, tiny_model_dir, monkeypatch):
    """Volumes 0 and 1 commit on the commit thread while the next volume is computed; the last
    commits on the main thread. Without the overlap no commit sees the next volume started;
    the features are the same either way, results come in order."""
    probe = CommitProbe(monkeypatch, wait=60)
    reported = []
    results = run_in_process(tmp_path / "overlap", tiny_model_dir, "0-2", report=lambda r: reported.append(r.volume_index))
    assert [r.state for r in results] == ["complete"] * 3 and reported == [0, 1, 2]
    assert probe.commits[0][0] and probe.commits[1][0] and not probe.commits[2][0]
    assert probe.commits[0][1].startswith("commit") and probe.commits[2][1] == "MainThread"

    serial = CommitProbe(monkeypatch, wait=1)
    results = run_in_process(tmp_path / "serial", tiny_model_dir, "0-2", overlap_commits=False)
    assert [r.state for r in results] == ["complete"] * 3
    assert not any(started for started, _ in serial.commits.values())
    for index in range(3):
        np.testing.assert_array_equal(features(VolumePaths(tmp_path / "overlap", index)),
                                      features(VolumePaths(tmp_path / "serial", index)))
        assert read_json(VolumePaths(tmp_path / "overlap", index).status)["state"] == "complete"


def test_a_failed_background_commit_fails_only_its_volume(tmp_path, tiny_model_dir, monkeypatch):
    from dinov3_cache.extraction import pipeline
    from dinov3_cache.extraction.config import PreprocessingError

    real_commit = pipeline.commit_volume

    def commit_volume(paths, commit_id, metadata):
        if paths.volume_index == 0:
            raise PreprocessingError("volume 0: the commit failed here")
        return real_commit(paths, commit_id, metadata)

    monkeypatch.setattr(pipeline, "commit_volume", commit_volume)
    results = run_in_process(tmp_path, tiny_model_dir, "0-1")
    assert [(r.volume_index, r.state) for r in results] == [(0, "failed"), (1, "complete")]
    assert "the commit failed here" in results[0].message
    failed = VolumePaths(tmp_path, 0)
    assert read_json(failed.status)["state"] == "failed"
    assert not failed.metadata.exists() and not failed.staging.exists()
    with VolumeLock(failed):  # released by the commit thread
        pass
    assert VolumePaths(tmp_path, 1).metadata.exists()


def test_termination_during_a_background_commit(tmp_path, tiny_model_dir, monkeypatch):
    """SIGTERM (as the handler raises it) while volume 0 commits on the commit thread and 1 is
    computed: 0 completes, 1 is recorded as terminated and removed, 2 never starts."""
    from dinov3_cache.extraction import pipeline
    from dinov3_cache.extraction.signals import Terminated

    committing = threading.Event()
    real_write, real_commit = pipeline.write_features, pipeline.commit_volume

    def commit_volume(paths, commit_id, metadata):
        committing.set()
        time.sleep(0.5)  # still committing when the signal arrives
        return real_commit(paths, commit_id, metadata)

    def write_features(loaded, crop, config, *rest):
        if config.volume_index == 1:
            assert committing.wait(timeout=60)
            raise Terminated(15)
        return real_write(loaded, crop, config, *rest)

    monkeypatch.setattr(pipeline, "commit_volume", commit_volume)
    monkeypatch.setattr(pipeline, "write_features", write_features)
    reported = []
    with pytest.raises(Terminated):
        run_in_process(tmp_path, tiny_model_dir, "0-2", report=reported.append)
    assert [(r.volume_index, r.state) for r in reported] == [(0, "complete")]
    assert read_json(VolumePaths(tmp_path, 0).status)["state"] == "complete"
    stopped = VolumePaths(tmp_path, 1)
    assert "Terminated" in read_json(stopped.status)["error"]
    assert not stopped.staging.exists() and not stopped.metadata.exists()
    assert not VolumePaths(tmp_path, 2).status.exists()
