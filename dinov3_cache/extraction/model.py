"""The DINOv3 model: loading any checkpoint (or a random-weight demo model) and the forward
pass that turns normalised slices into patch-token grids."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinov3_cache.errors import first_line
from dinov3_cache.extraction.normalization import normalization_for
from dinov3_cache.extraction.weights import (
    LOADED_HUB_COMMITS,
    RANDOM_MODEL_PRESETS,
    RANDOM_MODEL_SEED,
    RANDOM_PATCH_SIZE,
    ModelError,
    hub_offline_reason,
    is_random_model_id,
    random_preset,
    weights_identity,
)

log = logging.getLogger(__name__)

ATTENTION = "sdpa"  # torch's scaled_dot_product_attention: it picks flash / memory-efficient kernels itself
# How far last_hidden_state may be from the eager transformers forward in float32 (the truth) and
# keep the same fingerprint (the compute dtype is recorded, not fingerprinted), per compute dtype, in
# the measure TOLERANCE_MEASURE names. float32 on a CPU: exact. bf16: rounding error scales with the
# features and grows with depth and sharper attention, so the bound is relative, about twice the
# worst measured with random weights (docs/benchmarks.md#bf16-features); and since bf16 rounding is
# the model's own, our execution may be at most BF16_EXECUTION_RATIO times as far from the truth as
# the eager model in bf16 is (measured 0.77-1.00; 1.02 on the tests' 2-layer model).
FEATURE_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
TOLERANCE_MEASURE = {"float32": "max_abs", "bfloat16": "rms_relative"}
BF16_EXECUTION_RATIO = 1.25


def feature_difference(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """How far features (..., tokens, channels) are from a reference: the largest absolute
    difference; scale-free: that over the reference's largest value, the RMS of the difference
    over the reference's RMS, and the worst token's relative L2 difference (a single wrong
    token shows in it)."""
    got, want = got.double(), want.double()
    difference = got - want
    return {
        "max_abs": difference.abs().max().item(),
        "max_relative": (difference.abs().max() / want.abs().max()).item(),
        "rms_relative": (difference.norm() / want.norm()).item(),
        "token_relative": (difference.norm(dim=-1) / want.norm(dim=-1)).max().item(),
    }


def features_match(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, eager: torch.Tensor | None = None) -> bool:
    """got, from a forward in dtype, within FEATURE_TOLERANCE of want (the float32 truth, or
    another execution in dtype); given eager, the eager transformers model's output in dtype on
    the same input, got must also be no farther from want than BF16_EXECUTION_RATIO times it."""
    name = str(dtype).removeprefix("torch.")
    measure = TOLERANCE_MEASURE[name]
    distance = feature_difference(got, want)[measure]
    if eager is not None and distance > BF16_EXECUTION_RATIO * feature_difference(eager, want)[measure]:
        return False
    return distance <= FEATURE_TOLERANCE[name]


@dataclass(frozen=True)
class ExecutionOptions:
    """How the forward runs; the features stay the same within FEATURE_TOLERANCE, so none of
    this enters the fingerprint (it is recorded as configuration.execution)."""

    compile: bool = False
    compile_cache: Path | None = None  # torch inductor's persistent cache; None: no persistent cache


@dataclass
class LoadedModel:
    model: torch.nn.Module
    device: torch.device
    patch_size: int
    hidden_size: int
    prefix_tokens: int  # CLS + register tokens, dropped from the output
    normalization: dict
    identity: dict  # model id, revision, pretrained flag: recorded and fingerprinted
    execution: dict = field(default_factory=dict)  # attention kernel, RoPE tables, compiled: recorded only

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


def load_model(
    model_id: str, revision: str | None = None, device: str = "auto", execution: ExecutionOptions = ExecutionOptions()
) -> LoadedModel:
    """Any Hugging Face id or local directory, or 'random:PRESET' for an offline demo model."""
    torch_device = resolve_device(device)
    model, identity = transformers_model(model_id, revision)
    identity["weights"] = weights_identity(model_id, revision)
    model.eval().to(torch_device, torch.bfloat16 if torch_device.type == "cuda" else torch.float32)
    config = model.config
    cache_rope_tables(model)
    return LoadedModel(
        model=compiled(model, execution.compile_cache) if execution.compile else model,
        device=torch_device,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        prefix_tokens=1 + config.num_register_tokens,
        normalization=normalization_for(model_id),
        identity=identity,
        execution={"attention": config._attn_implementation, "rope_tables": "cached per image size",
                   "compiled": execution.compile},
    )


def transformers_model(model_id: str, revision: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The model as transformers builds it (float32, sdpa attention, on the CPU) and its identity."""
    if is_random_model_id(model_id):
        return build_random_model(model_id)
    return load_pretrained_model(model_id, revision)


def build_random_model(model_id: str) -> tuple[torch.nn.Module, dict]:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    preset = random_preset(model_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_MODEL_SEED)
        config = DINOv3ViTConfig(patch_size=RANDOM_PATCH_SIZE, **RANDOM_MODEL_PRESETS[preset])
        config._attn_implementation = ATTENTION
        model = DINOv3ViTModel(config)
    log.warning(
        "model %s has RANDOM weights (not pretrained): features are for testing the pipeline only", model_id
    )
    identity = {"model_id": model_id, "revision": None, "pretrained": False, "random_seed": RANDOM_MODEL_SEED,
                "config": RANDOM_MODEL_PRESETS[preset]}
    return model, identity


def load_pretrained_model(model_id: str, revision: str | None) -> tuple[torch.nn.Module, dict]:
    """A local directory, or a hub id: from the hub when it answers, else from the local cache
    only, so an offline machine fails at once with one line (no connection retries)."""
    from transformers import DINOv3ViTModel

    if not Path(model_id).is_dir() and model_id.startswith(("/", ".", "~")):
        raise ModelError(f"cannot load model {model_id!r}: no such directory; give a directory holding config.json and "
                         "model.safetensors, or a Hugging Face id such as facebook/dinov3-vitl16-pretrain-sat493m")
    offline = None if Path(model_id).is_dir() else hub_offline_reason()
    hub_log = logging.getLogger("huggingface_hub")
    hub_level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings only delay the one line below
    try:
        model = DINOv3ViTModel.from_pretrained(
            model_id, revision=revision, local_files_only=offline is not None, attn_implementation=ATTENTION
        )
    except (OSError, ValueError) as e:
        cause = f"not in the local Hugging Face cache and {offline}" if offline else first_line(e, 200)
        raise ModelError(
            f"cannot load model {model_id!r} ({cause}); pass --model-id a local directory holding config.json and "
            "model.safetensors (fetch it with 'hf download <id> --local-dir DIR'), run with network access to the hub, "
            "or set HF_HUB_OFFLINE=1 with the model in the Hugging Face cache; --model-id random:tiny runs an offline demo"
        ) from None
    finally:
        hub_log.setLevel(hub_level)
    commit = getattr(model.config, "_commit_hash", None)
    if commit and not Path(model_id).is_dir():
        LOADED_HUB_COMMITS[(model_id, revision)] = commit
    identity = {"model_id": model_id, "revision": revision or commit, "commit_hash": commit, "pretrained": True}
    return model, identity


# ----------------------------------------------------------------------------- faster forward


class CachedRopeTables(torch.nn.Module):
    """The model's own RoPE module, its (cos, sin) tables kept per (height, width, device, dtype):
    the module rebuilds them on every forward though they depend only on the image size."""

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        self.rope = rope
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope.training:  # training jitters the coordinates: nothing to cache
            return self.rope(pixel_values)
        key = (*pixel_values.shape[-2:], pixel_values.device, pixel_values.dtype)
        if key not in self.tables:
            self.tables[key] = self.rope(pixel_values)
        return self.tables[key]


def cache_rope_tables(model: torch.nn.Module) -> None:
    """Wrap this model instance's RoPE module (the library's class is left alone)."""
    if not isinstance(model.rope_embeddings, CachedRopeTables):
        model.rope_embeddings = CachedRopeTables(model.rope_embeddings)


def compiled(model: torch.nn.Module, cache_dir: Path | None) -> torch.nn.Module:
    """torch.compile with inductor's FX graph cache in cache_dir: the first process compiles,
    later ones with the same torch, model and shapes load the kernels from there."""
    import torch._inductor.config as inductor_config

    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).absolute())
    inductor_config.fx_graph_cache = True
    rope = model.rope_embeddings  # a dictionary lookup: kept outside the compiled graphs
    rope.forward = torch.compiler.disable(rope.forward)
    return torch.compile(model)


def compile_cache_counts() -> dict[str, int]:
    """Inductor FX graph cache hits and misses in this process so far."""
    from torch._dynamo.utils import counters

    return {"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}


@torch.inference_mode()
def token_grids(loaded: LoadedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> patch-token grids (B, C, S/p, S/p), float32."""
    hidden = loaded.model(pixel_values=pixel_values.to(loaded.compute_dtype)).last_hidden_state
    patches = hidden[:, loaded.prefix_tokens :].float()
    grid = pixel_values.shape[-1] // loaded.patch_size
    return patches.reshape(len(patches), grid, grid, -1).permute(0, 3, 1, 2).contiguous()
