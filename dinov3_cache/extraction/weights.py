"""Which weights a model id loads, without loading them (no torch here): the identity that
the configuration fingerprint records. A random demo model is its preset and seed, a local
directory a sha256 of its weight files, a hub id the commit it resolves to."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from dinov3_cache.errors import CacheToolError, first_line

log = logging.getLogger(__name__)


class ModelError(CacheToolError, ValueError):
    """A model or device that cannot be used; the message is one line saying what to do."""


# Offline demo models: random weights, built from DINOv3ViTConfig. 'random:tiny' is the default demo.
RANDOM_MODEL_PRESETS = {
    "tiny": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, num_register_tokens=4),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_register_tokens=4),
    "vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_register_tokens=4),
    "vitl16-1layer": dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096, num_register_tokens=4),
}
RANDOM_MODEL_SEED = 0
RANDOM_PATCH_SIZE = 16
# the files whose bytes decide a local checkpoint's outputs
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "config.json")
HASH_READ_BYTES = 16 * 2**20
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


RANDOM_PREFIX = "random:"
RANDOM_MODEL_IDS = ", ".join(RANDOM_PREFIX + name for name in RANDOM_MODEL_PRESETS)
# what to do when a model cannot be found: every way to give one that works offline
MODEL_CHOICES = (
    "pass --model-id a local directory with config.json and weights ('hf download ID --local-dir DIR'), "
    "run where the Hugging Face hub is reachable, or set HF_HUB_OFFLINE=1 with the model cached; "
    f"a random demo model ({RANDOM_MODEL_IDS}) runs offline"
)


def is_random_model_id(model_id: str) -> bool:
    """'random:PRESET' names an offline demo model; anything else is a directory or a hub id."""
    return model_id.startswith(RANDOM_PREFIX)


def random_preset(model_id: str) -> str:
    """The preset a 'random:PRESET' id names; 'random:' alone names none and is refused (it
    would be recorded as given, not as the preset it builds)."""
    preset = model_id.partition(":")[2]
    if preset not in RANDOM_MODEL_PRESETS:
        raise ModelError(f"unknown random model {model_id!r}; choose one of {RANDOM_MODEL_IDS}")
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
    if is_random_model_id(model_id):
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


HUB_PROBE_TIMEOUT_SECONDS = 3.0


def hub_offline_reason() -> str | None:
    """Why the hub cannot be asked (HF_HUB_OFFLINE set, or it does not answer a HEAD request
    within a few seconds), or None when it answers."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids downloading it"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_SECONDS)
    except Exception as e:  # any failure to get an answer (DNS, refused, timeout, proxy) means unreachable
        return f"the hub {constants.ENDPOINT} is unreachable: {first_line(e, 120)}"
    return None
