#!/usr/bin/env python
"""bf16 features against float32: the pipeline's execution against the eager transformers model.

    python -m benchmarks.bench_bf16_tolerance [--models random:tiny random:small random:vitl16]
        [--sizes 256] [--batch-size 2] [--attention-scales 1 2 4] [--device cpu|cuda] [--compile]

For each model, slice size and attention scale, on one batch of random pixels, last_hidden_state of
  truth:      the eager transformers model (attn_implementation="eager") in float32;
  eager bf16: the same model with bf16 weights and activations;
  ours bf16:  load_model's execution (sdpa attention, RoPE tables cached per image size,
              --compile optionally) with bf16 weights and activations, as on a GPU;
and prints each distance (max |difference|, that over max |reference|, RMS over RMS, the worst
token's relative L2 error: model.feature_difference), the ratio of ours to eager bf16 in distance
from the truth (the baseline: what bf16 itself costs), and whether model.features_match holds
(for ours against float32 with the eager bf16 output as the baseline).
Random weights attend almost uniformly, so the token positions (RoPE) barely matter to them;
--attention-scales multiplies the query and key projections (the attention logits by its square)
to make attention as position-dependent as a trained model's. --models takes any model id
load_model does (a local checkpoint directory gives the figures of real weights).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from dinov3_cache.errors import CacheToolError
from dinov3_cache.extraction.model import (
    BF16_EXECUTION_RATIO,
    FEATURE_TOLERANCE,
    TOLERANCE_MEASURE,
    ExecutionOptions,
    feature_difference,
    features_match,
    load_model,
    resolve_device,
    transformers_model,
)

MEASURES = ("max_abs", "max_relative", "rms_relative", "token_relative")
COMPARED = ("eager bf16 vs float32", "ours bf16 vs float32", "ours vs eager bf16")


def sharpen_attention(model: torch.nn.Module, scale: float) -> None:
    """Multiply every layer's query and key projections by scale: attention logits by scale^2."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                for parameter in (*module.q_proj.parameters(), *module.k_proj.parameters()):
                    parameter.mul_(scale)


def mean_top_attention(attentions: tuple[torch.Tensor, ...]) -> float:
    """Mean over layers, heads and queries of the largest attention weight (1/tokens when uniform)."""
    return torch.stack([a.float().amax(-1).mean() for a in attentions]).mean().item()


@torch.inference_mode()
def outputs(model_id: str, scale: float, x: torch.Tensor, device: torch.device, compile: bool) -> tuple[dict, float]:
    """last_hidden_state of the truth, eager bf16 and ours bf16 on x, and the truth's mean top attention."""
    truth, _ = transformers_model(model_id)
    truth.set_attn_implementation("eager")
    sharpen_attention(truth, scale)
    truth.eval().to(device, torch.float32)
    eager_bf16 = copy.deepcopy(truth).to(torch.bfloat16)
    ours = load_model(model_id, device=str(device), execution=ExecutionOptions(compile=compile)).model
    sharpen_attention(ours, scale)
    ours.to(torch.bfloat16)  # a no-op on a GPU, where load_model already gives bf16

    result = truth(pixel_values=x, output_attentions=True)
    top = mean_top_attention(result.attentions)
    hidden = {"truth": result.last_hidden_state, "eager bf16": eager_bf16(pixel_values=x.bfloat16()).last_hidden_state,
              "ours bf16": ours(pixel_values=x.bfloat16()).last_hidden_state}
    return hidden, top


def compare(hidden: dict) -> tuple[dict[str, dict[str, float]], dict[str, bool]]:
    """Each distance of COMPARED, and whether it is within the bf16 tolerance."""
    pairs = dict(zip(COMPARED, [("eager bf16", "truth"), ("ours bf16", "truth"), ("ours bf16", "eager bf16")]))
    distances = {name: feature_difference(hidden[got], hidden[want]) for name, (got, want) in pairs.items()}
    matches = {name: features_match(hidden[got], hidden[want], torch.bfloat16) for name, (got, want) in pairs.items()}
    matches[COMPARED[1]] = features_match(hidden["ours bf16"], hidden["truth"], torch.bfloat16, eager=hidden["eager bf16"])
    return distances, matches


def report(label: str, distances: dict, matches: dict, seconds: float) -> None:
    print(f"{label} ({seconds:.0f} s)")
    print(f"  {'':24s} {'max|diff|':>10s} {'/max|ref|':>10s} {'rms/rms':>10s} {'worst token':>12s}  within tolerance")
    for name in COMPARED:
        d = distances[name]
        print(f"  {name:24s} " + " ".join(f"{d[m]:10.3g}" for m in MEASURES[:3]) + f" {d['token_relative']:12.3g}  {matches[name]}")
    ratios = {m: distances[COMPARED[1]][m] / distances[COMPARED[0]][m] for m in MEASURES}
    print(f"  {'ratio ours / eager bf16':24s} " + " ".join(f"{ratios[m]:10.2f}" for m in MEASURES[:3])
          + f" {ratios['token_relative']:12.2f}  (distance from float32)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["random:tiny", "random:small", "random:vitl16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256], help="slice sizes (multiples of the patch size)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--attention-scales", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the truth then runs on the GPU, TF32 off)")
    parser.add_argument("--compile", action="store_true", help="our execution with torch.compile")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except CacheToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 stays float32
    measure, bound = TOLERANCE_MEASURE["bfloat16"], FEATURE_TOLERANCE["bfloat16"]
    print(f"bf16 tolerance: {measure} <= {bound:g}, and ours at most {BF16_EXECUTION_RATIO:g} x as far from float32 as "
          f"eager bf16; {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    worst = {name: 0.0 for name in (*COMPARED, "ratio")}
    for model_id in args.models:
        for size in args.sizes:
            for scale in args.attention_scales:
                started = time.perf_counter()
                x = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
                try:
                    hidden, top = outputs(model_id, scale, x, device, args.compile)
                except CacheToolError as e:  # an unknown model id
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                distances, matches = compare(hidden)
                for name in COMPARED:
                    worst[name] = max(worst[name], distances[name][measure])
                worst["ratio"] = max(worst["ratio"], distances[COMPARED[1]][measure] / distances[COMPARED[0]][measure])
                report(f"{model_id}, {size}^2 x {args.batch_size}, attention x{scale:g} (mean top attention weight {top:.3f})",
                       distances, matches, time.perf_counter() - started)
    print(f"worst {measure}: " + ", ".join(f"{name} {worst[name]:.3g}" for name in COMPARED)
          + f" (tolerance {bound:g}); worst ratio ours / eager bf16 {worst['ratio']:.2f} (tolerance {BF16_EXECUTION_RATIO:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
