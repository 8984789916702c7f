"""The DINOv3 model: loading any checkpoint (or a random-weight demo model) and the forward
pass that turns normalised slices into patch-token grids."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dinov3_cache.errors import CacheToolError, first_line
from dinov3_cache.layout import read_json

log = logging.getLogger("dinov3_model")


class ModelError(CacheToolError, ValueError):
    """A model or device that cannot be used; the message is one line saying what to do."""


# Normalisation constants by pretraining data (DINOv3 model cards).
SAT493M_NORMALIZATION = {"family": "SAT-493M", "mean": [0.430, 0.411, 0.296], "std": [0.213, 0.156, 0.143]}
IMAGENET_NORMALIZATION = {"family": "LVD-1689M (ImageNet)", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# Offline demo models: random weights, built from DINOv3ViTConfig. 'random:tiny' is the default demo.
RANDOM_MODEL_PRESETS = {
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, num_register_tokens=4),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_register_tokens=4),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_register_tokens=4),
    "vitl16-1layer": dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096, num_register_tokens=4),
}
RANDOM_MODEL_SEED = 0
# the files whose bytes decide a local checkpoint's outputs
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "config.json")
HASH_READ_BYTES = 16 * 2**20
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")

@dataclass
class LoadedModel:
    model: torch.nn.Module
    device: torch.device
    patch_size: int
    hidden_size: int
    prefix_tokens: int  # CLS + register tokens, dropped from the output
    normalization: dict
    identity: dict  # model id, revision, pretrained flag: recorded and fingerprinted

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 weights and activations on a GPU (faster than autocast: no per-call weight casts)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


def load_model(model_id: str, revision: str | None = None, device: str = "auto") -> LoadedModel:
    """Any Hugging Face id or local directory, or 'random:PRESET' for an offline demo model."""
    torch_device = resolve_device(device)
    if model_id.startswith("random"):
        model, identity = build_random_model(model_id)
    else:
        model, identity = load_pretrained_model(model_id, revision)
    identity["weights"] = weights_identity(model_id, revision)
    model.eval().to(torch_device, torch.bfloat16 if torch_device.type == "cuda" else torch.float32)
    config = model.config
    return LoadedModel(
        model=model,
        device=torch_device,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        prefix_tokens=1 + config.num_register_tokens,
        normalization=normalization_for(model_id),
        identity=identity,
    )


def build_random_model(model_id: str) -> tuple[torch.nn.Module, dict]:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    preset = random_preset(model_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_MODEL_SEED)
        model = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, **RANDOM_MODEL_PRESETS[preset]))
    log.warning(
        "model %s has RANDOM weights (not pretrained): features are for testing the pipeline only", model_id
    )
    identity = {"model_id": model_id, "revision": None, "pretrained": False, "random_seed": RANDOM_MODEL_SEED,
                "config": RANDOM_MODEL_PRESETS[preset]}
    return model, identity


def load_pretrained_model(model_id: str, revision: str | None) -> tuple[torch.nn.Module, dict]:
    from transformers import DINOv3ViTModel

    try:
        model = DINOv3ViTModel.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load model {model_id!r} ({first_line(e, 200)}); pass --model-id a local directory holding "
            "config.json and model.safetensors (download it where the hub is reachable with "
            "'hf download <id> --local-dir DIR'), or use --model-id random:tiny for an offline demo"
        ) from None
    commit = getattr(model.config, "_commit_hash", None)
    if commit and not Path(model_id).is_dir():
        LOADED_HUB_COMMITS[(model_id, revision)] = commit
    identity = {"model_id": model_id, "revision": revision or commit, "commit_hash": commit, "pretrained": True}
    return model, identity


def random_preset(model_id: str) -> str:
    preset = model_id.partition(":")[2] or "tiny"
    if preset not in RANDOM_MODEL_PRESETS:
        raise ModelError(
            f"unknown random model {model_id!r}; choose random:{' or random:'.join(RANDOM_MODEL_PRESETS)}"
        )
    return preset


# ----------------------------------------------------------------------------- weights identity

LOADED_HUB_COMMITS: dict[tuple[str, str | None], str] = {}  # (model id, revision) -> commit this process loaded
_LOCAL_DIGESTS: dict[tuple, str] = {}  # keyed by the files' names, sizes, mtimes and inodes


def weights_identity(model_id: str, revision: str | None = None) -> dict:
    """What decides the weights a model id loads, for the configuration fingerprint:
    the preset and seed of a random model, a sha256 of a local directory's weight files and
    config.json, or a hub model's commit. The hub commit is the one this process loaded,
    else resolved without downloading weights (a commit-hash revision, the hub's model_info,
    or the local cache's refs); {"commit": None} when none of those answers (offline, not
    cached): the caller then resolves it by loading the model."""
    if model_id.startswith("random"):
        return {"kind": "random", "preset": random_preset(model_id), "seed": RANDOM_MODEL_SEED}
    directory = Path(model_id)
    if directory.is_dir():
        return {"kind": "local", "sha256": local_weights_digest(directory)}
    commit = LOADED_HUB_COMMITS.get((model_id, revision)) or resolve_hub_commit(model_id, revision)
    return {"kind": "hub", "commit": commit}


def weights_identity_resolved(identity: dict) -> bool:
    return identity.get("kind") != "hub" or identity.get("commit") is not None


def local_weights_digest(directory: Path) -> str:
    """sha256 over the weight files and config.json (names and contents), computed once per
    process for unchanged files."""
    files = sorted({p for pattern in WEIGHT_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()})
    stats = [p.stat() for p in files]
    key = (str(directory.resolve()), tuple((p.name, s.st_size, s.st_mtime_ns, s.st_ino) for p, s in zip(files, stats)))
    if key not in _LOCAL_DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\0")
        _LOCAL_DIGESTS[key] = digest.hexdigest()
    return _LOCAL_DIGESTS[key]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a hub id and revision load, without downloading weights, or None."""
    if revision and COMMIT_HASH.fullmatch(revision):
        return revision
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        from huggingface_hub import model_info

        try:
            return model_info(model_id, revision=revision, timeout=30).sha
        except Exception as e:  # unreachable hub, gated or unknown repo: the cache or the load decides
            log.info("cannot resolve %s on the hub (%s); trying the local cache", model_id, first_line(e, 200))
    return cached_hub_commit(model_id, revision)


def cached_hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit the local hub cache maps a revision to (what an offline load reads)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model_id, repo_type="model") / "refs" / (revision or "main")
    try:
        commit = ref.read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT_HASH.fullmatch(commit) else None


def normalization_for(model_id: str) -> dict:
    """Mean/std of the pretraining data: the local preprocessor config if any, else the model family."""
    if model_id.startswith("random"):
        return IMAGENET_NORMALIZATION
    preprocessor = Path(model_id) / "preprocessor_config.json"
    if preprocessor.is_file():
        cfg = read_json(preprocessor)
        if "image_mean" in cfg and "image_std" in cfg:
            return {"family": "preprocessor_config.json", "mean": cfg["image_mean"], "std": cfg["image_std"]}
    return SAT493M_NORMALIZATION if "sat493m" in model_id.lower() else IMAGENET_NORMALIZATION


@torch.inference_mode()
def token_grids(loaded: LoadedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> patch-token grids (B, C, S/p, S/p), float32."""
    hidden = loaded.model(pixel_values=pixel_values.to(loaded.compute_dtype)).last_hidden_state
    patches = hidden[:, loaded.prefix_tokens :].float()
    grid = pixel_values.shape[-1] // loaded.patch_size
    return patches.reshape(len(patches), grid, grid, -1).permute(0, 3, 1, 2).contiguous()
