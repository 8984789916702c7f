"""Fault campaign: kill -9 at every targeted system call of a normal run and of an
overwrite, SIGTERM after the commit, and damaged chunks and arrays; one table of trials and
failures per category.

    python -m benchmarks.fault_campaign            # the whole campaign
    python -m benchmarks.fault_campaign --short    # kills in the commit window only

A kill is injected with strace (`-e inject=SYSCALLS:signal=SIGKILL:when=K`, counted per
thread) at the K-th rename/unlink/rmdir, K = 1, 2, ... until the run finishes. After each
kill the loader and `check_preprocessing.py --verify-indices` must see one complete volume,
old or new (or, for a first run, none), and a rerun must leave no debris.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRACED = "rename,renameat,renameat2,unlink,unlinkat,rmdir"
TINY_GEOMETRY = ["--output-image-dim", "16", "--base-resolution", "128", "--min-resolution-for-raw", "32"]


@dataclass
class Tally:
    trials: int = 0
    failures: list[str] = field(default_factory=list)


def run_args(out: Path, model: Path, index: int = 0, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "preprocess_volume.py"), "--volume-index", str(index), "--output-dir", str(out),
        "--source", "synthetic", "--model-id", str(model), *TINY_GEOMETRY, *extra,
    ]


def killed_run(args: list[str], k: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """The run, killed with SIGKILL at its k-th traced system call (in any one thread)."""
    strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={TRACED}",
              "-e", f"inject={TRACED}:signal=SIGKILL:when={k}"]
    return subprocess.run(strace + args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def commit_window_ks(args: list[str], out: Path) -> list[int]:
    """The k of every traced system call of the run's main thread that touches the volume's
    committed names (arrays, commit directory, metadata), from one traced run (no kill)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        subprocess.run(["strace", "-f", "-qq", "-o", log.name, "-e", f"trace={TRACED}", *args],
                       check=True, capture_output=True, cwd=REPO)
        lines = [line for line in log.read().splitlines() if "(" in line and not line.split(None, 1)[1].startswith("---")]
    main_pid = lines[0].split()[0] if lines else None
    ks, k = [], 0
    for line in lines:
        if line.split()[0] != main_pid or "resumed>" in line:
            continue
        k += 1
        if str(out) in line and ".partial/" not in line.split(",")[0] and "logs/" not in line:
            ks.append(k)
    return ks


def committed_features(out: Path, index: int = 0, verify_checksums: bool = True) -> np.ndarray | None:
    """The volume as the loader hands it to training, or None when none is committed."""
    from dinov3_cache.layout import is_volume_complete
    from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset

    if not is_volume_complete(out, index):
        return None
    dataset = PreprocessedDINOv3Dataset(out, [index], num_threads=2, verify_checksums=verify_checksums)
    return dataset[0][0].numpy()


def verify_ok(out: Path, index: int = 0) -> bool:
    result = subprocess.run(
        [sys.executable, str(REPO / "check_preprocessing.py"), "--output-dir", str(out), "--indices", str(index),
         "--verify-indices", str(index)],
        capture_output=True, text=True, cwd=REPO,
    )
    return result.returncode == 0


def debris_left(out: Path, index: int = 0) -> list[str]:
    from dinov3_cache.layout import VolumePaths, partial_debris

    return [p.name for p in partial_debris(VolumePaths(out, index))]


def kill_campaign(model: Path, work: Path, overwrite: bool, ks, tally: Tally) -> None:
    """Kill a normal run (overwrite=False: into an empty directory) or an overwrite of a
    complete volume at each k (None: 1, 2, ... until the run finishes; "commit": each call
    of the main thread on the volume's committed names); check old-or-new after each kill and no debris after a rerun."""
    base = work / ("base_overwrite" if overwrite else "base_new")
    old = None
    if overwrite:
        subprocess.run(run_args(base, model, 0, "--planes", "xy"), check=True, capture_output=True, cwd=REPO)
        old = committed_features(base)
    reference = work / "reference"
    if not reference.exists():
        subprocess.run(run_args(reference, model), check=True, capture_output=True, cwd=REPO)
    new = committed_features(reference)
    extra = ["--overwrite"] if overwrite else []
    if ks == "commit":
        probe = work / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        if overwrite:
            shutil.copytree(base, probe)
        ks = commit_window_ks(run_args(probe, model, 0, *extra), probe)
        shutil.rmtree(probe, ignore_errors=True)
    for k in ks or itertools.count(1):
        out = work / f"kill_{int(overwrite)}_{k}"
        shutil.rmtree(out, ignore_errors=True)
        if overwrite:
            shutil.copytree(base, out)
        result = killed_run(run_args(out, model, 0, *extra), k)
        tally.trials += 1
        problem = check_after_kill(out, model, old, new, extra, result.returncode)
        if problem:
            tally.failures.append(f"k={k}: {problem}")
        shutil.rmtree(out, ignore_errors=True)
        if result.returncode == 0 and not ks:
            break


def check_after_kill(out: Path, model: Path, old, new, extra: list[str], returncode: int) -> str | None:
    try:
        seen = committed_features(out)
    except Exception as e:  # noqa: BLE001 - any loader error here is a lost volume
        return f"the loader refuses the volume after the kill ({str(e).splitlines()[0]})"
    if seen is None and old is not None:
        return "the old volume is gone"
    if seen is not None and not any(v is not None and np.array_equal(seen, v) for v in (old, new)):
        return "the volume is neither the old nor the new one"
    if seen is not None and not verify_ok(out):
        return "--verify fails"
    rerun = subprocess.run(run_args(out, model, 0, *extra), capture_output=True, text=True, cwd=REPO)
    if rerun.returncode != 0:
        return f"the rerun exits {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}"
    left = debris_left(out)
    if left:
        return f"debris after a rerun: {left}"
    if not np.array_equal(committed_features(out), new):
        return "the rerun's volume differs from a clean run's"
    return None


def sigterm_after_commit(model: Path, work: Path, tally: Tally) -> None:
    """SIGTERM at the commit (the metadata rename) and after: a complete volume exits 0."""
    for when in (1, 2, 3):
        out = work / f"term_{when}"
        shutil.rmtree(out, ignore_errors=True)
        strace = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=rename",
                  "-e", f"inject=rename:signal=SIGTERM:when={when}", "-P", str(out / "volume_000000_metadata.json")]
        result = subprocess.run(strace + run_args(out, model), capture_output=True, text=True, cwd=REPO)
        tally.trials += 1
        from dinov3_cache.layout import is_volume_complete

        if is_volume_complete(out, 0) and result.returncode != 0:
            tally.failures.append(f"SIGTERM at metadata rename #{when}: complete volume, exit {result.returncode}")
        shutil.rmtree(out, ignore_errors=True)


def damage_campaign(cache: Path, work: Path, silent: Tally, any_damage: Tally) -> None:
    """Each damage of a committed volume: without verify_checksums no wrong value may reach
    training silently, with it none may reach training at all."""
    from dinov3_cache.layout import VolumePaths

    def damages(root: Path):
        v0, v1 = VolumePaths(root, 0), VolumePaths(root, 1)
        # (name, detected without verify_checksums, damage)
        yield "deleted chunk", True, lambda: (v0.array("features") / "0.0.0.0").unlink()
        yield "flipped bytes", False, lambda: flip(v0.array("features") / "0.0.0.0", 100)
        yield "chunk from another volume", False, lambda: shutil.copy(v1.array("features") / "0.0.0.0", v0.array("features") / "0.0.0.0")
        yield "dtype <f2 -> <i2", True, lambda: edit(v0.array("features") / ".zarray", '"<f2"', '"<i2"')
        yield "NaNs in a chunk", False, lambda: nans(v0.array("features") / "0.0.0.0")
        yield "feature arrays swapped", True, lambda: swap(v0.array("features"), v1.array("features"))
        yield "gt chunk shape changed", True, lambda: edit(v0.array("gt") / ".zarray", '"chunks":[16,', '"chunks":[8,')

    clean = committed_features(cache, verify_checksums=False)
    copy = work / "damaged"
    for name, always, damage in damages(copy):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(cache, copy)
        damage()
        for verify, tally in ((False, silent), (True, any_damage)):
            if not (verify or always):
                continue
            tally.trials += 1
            try:
                seen = committed_features(copy, verify_checksums=verify)
            except Exception:  # noqa: BLE001 - refusing is the right answer
                continue
            if not np.array_equal(seen, clean):
                tally.failures.append(f"{name} (verify_checksums={verify}): wrong values delivered silently")
            else:
                tally.failures.append(f"{name} (verify_checksums={verify}): damage not detected")
        shutil.rmtree(copy, ignore_errors=True)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def nans(path: Path) -> None:
    data = np.frombuffer(path.read_bytes(), np.float16).copy()
    data[:10] = np.nan
    path.write_bytes(data.tobytes())


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    path.write_text(text.replace(old, new, 1))


def swap(a: Path, b: Path) -> None:
    aside = a.with_name(a.name + ".swap")
    a.rename(aside)
    b.rename(a)
    aside.rename(b)


def make_model(directory: Path) -> Path:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_register_tokens=2)
    path = directory / "tiny-dinov3"
    DINOv3ViTModel(config).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="kill at a few system calls only")
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is missing (apt-get install strace): the kill campaign is skipped", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work)
        tallies = {name: Tally() for name in (
            "kill -9, normal run", "kill -9, overwrite", "SIGTERM after commit",
            "damage checked always (missing chunk, dtype, commit id, chunks)", "damage, verify_checksums: none delivered")}
        ks = "commit" if args.short else None
        kill_campaign(model, work, False, ks, tallies["kill -9, normal run"])
        kill_campaign(model, work, True, ks, tallies["kill -9, overwrite"])
        sigterm_after_commit(model, work, tallies["SIGTERM after commit"])
        cache = work / "cache"
        for index in (0, 1):
            subprocess.run(run_args(cache, model, index), check=True, capture_output=True, cwd=REPO)
        damage_campaign(cache, work, tallies["damage checked always (missing chunk, dtype, commit id, chunks)"],
                        tallies["damage, verify_checksums: none delivered"])
    print("| category | trials | failures |\n| --- | ---: | ---: |")
    for name, tally in tallies.items():
        print(f"| {name} | {tally.trials} | {len(tally.failures)} |")
    for name, tally in tallies.items():
        for failure in tally.failures:
            print(f"{name}: {failure}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 1 if any(t.failures for t in tallies.values()) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
