"""Several volumes per process, the cached RoPE tables, the attention kernel and the
persistent compilation cache: the features stay those of the eager transformers model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
import torch
from conftest import REPO, call_main, preprocess_args

from dinov3_cache.extraction.model import FEATURE_TOLERANCE, CachedRopeTables, load_model
from dinov3_cache.layout import VolumeLock, VolumePaths, read_json


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
