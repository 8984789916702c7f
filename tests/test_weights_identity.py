"""The configuration fingerprint names the weights loaded, not the revision asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import call_main, preprocess_args

from dinov3_cache.extraction.model import load_model
from dinov3_cache.extraction.weights import RANDOM_MODEL_SEED, ModelError, weights_identity, weights_identity_resolved
from dinov3_cache.paths import VolumePaths
from dinov3_cache.records import read_json


def save_tiny_model(path: Path, seed: int) -> None:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    config = DINOv3ViTConfig(patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_register_tokens=2)
    DINOv3ViTModel(config).save_pretrained(path)


def test_local_checkpoint_identity_follows_its_weights(tmp_path):
    model_dir = tmp_path / "dinov3"  # one directory name, its weights rewritten
    save_tiny_model(model_dir, seed=0)
    first = weights_identity(str(model_dir))
    save_tiny_model(model_dir, seed=1)
    other = weights_identity(str(model_dir))
    save_tiny_model(model_dir, seed=0)
    again = weights_identity(str(model_dir))
    assert first["kind"] == "local" and len(first["sha256"]) == 64
    assert other != first
    assert again == first
    assert weights_identity_resolved(first)


def test_loaded_model_records_its_weights_identity(tmp_path):
    save_tiny_model(tmp_path / "m", seed=3)
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert loaded.identity["weights"] == weights_identity(str(tmp_path / "m"))


def test_random_model_identity_is_preset_and_seed():
    assert weights_identity("random:small") == {"kind": "random", "preset": "small", "seed": RANDOM_MODEL_SEED}
    with pytest.raises(ModelError, match="unknown random model"):
        weights_identity("random:huge")
    with pytest.raises(ModelError, match="unknown random model 'random:'"):  # names no preset: not recorded as one
        weights_identity("random:")


def test_hub_identity_from_a_commit_revision_or_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    assert weights_identity("facebook/some-dinov3", commit) == {"kind": "hub", "commit": commit}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    unresolved = weights_identity("facebook/some-dinov3")
    assert unresolved == {"kind": "hub", "commit": None} and not weights_identity_resolved(unresolved)
    refs = tmp_path / "models--facebook--some-dinov3" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    assert weights_identity("facebook/some-dinov3") == {"kind": "hub", "commit": commit}
    assert weights_identity("facebook/some-dinov3", "v2")["commit"] is None  # another ref, not cached


def test_rerun_skips_same_weights_and_refuses_rewritten_weights(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, seed=0)
    out = tmp_path / "cache"
    args = preprocess_args(out, 0, model_dir)
    call_main("preprocess_volume", *args, check=True)
    meta = read_json(VolumePaths(out, 0).metadata)
    assert meta["configuration"]["fingerprint_inputs"]["weights"] == weights_identity(str(model_dir))
    again = call_main("preprocess_volume", *args, check=True)
    assert "already complete; skipping" in again.stdout
    save_tiny_model(model_dir, seed=1)
    changed = call_main("preprocess_volume", *args)
    assert changed.returncode == 1 and "different configuration" in changed.stderr
    assert json.loads(VolumePaths(out, 0).metadata.read_text()) == meta
