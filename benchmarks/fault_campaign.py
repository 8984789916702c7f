"""Fault campaign: a normal run and an overwrite killed (SIGKILL) at each of their renames,
unlinks and directory removals in turn (the k-th such call, k = 1, 2, ... until the run
finishes), kills at random times, SIGTERM at each call, two runs of one index at once,
damaged volumes, a full file system; one table of trials and failures per category.

    python -m benchmarks.fault_campaign [--random N] [--concurrent N]

A failure is a volume lost or mixed (after a kill the loader, which verifies checksums by
default, and `check_preprocessing.py --verify-indices` must see one complete volume, old or
new, or for a first run none), debris left after a rerun, or wrong values delivered silently
(damage: with default settings, for every kind; with verify_checksums=False, for the kinds
checked regardless of checksums). Kills are
made by benchmarks/fault_injection.py (needs a C compiler); the full disk needs root (tmpfs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.fault_injection import FaultInjectionUnavailable, ForkServer, RunResult

TINY_GEOMETRY = ["--output-image-dim", "16", "--base-resolution", "128", "--min-resolution-for-raw", "32"]
MAX_CALLS = 1000  # a sweep stops here even if the runs never finish (each such run is a failure)
DAMAGE_CHUNKS = ["--chunks", "32,8,8,8"]
NEW_PLANES, OLD_PLANES = ["--planes", "xy"], ["--planes", "xz"]  # two configurations, two different volumes


@dataclass
class Tally:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    notes: str = ""


@dataclass
class Campaign:
    """The fork server, the model, and the two reference volumes every trial is compared with."""

    server: ForkServer
    work: Path
    model: Path
    old: np.ndarray | None = None  # the complete volume an overwrite replaces (work/base)
    new: np.ndarray | None = None  # what a clean run of the trials' configuration writes

    def args(self, out: Path, *extra: str, index: int = 0, planes: list[str] = NEW_PLANES) -> list[str]:
        return ["--volume-index", str(index), "--output-dir", str(out), "--source", "synthetic",
                "--model-id", str(self.model), *TINY_GEOMETRY, *planes, *extra]

    def prepare(self) -> Campaign:
        for out, planes in ((self.work / "reference", NEW_PLANES), (self.work / "base", OLD_PLANES)):
            result = self.server.run(self.args(out, planes=planes))
            if result.returncode != 0:
                raise RuntimeError(f"the reference run failed: {result.stderr[-2000:]}")
        self.new, self.old = committed_features(self.work / "reference"), committed_features(self.work / "base")
        if np.array_equal(self.old, self.new):
            raise RuntimeError("the old and new configurations give the same volume: a mix could not be seen")
        return self

    def trial_dir(self, name: str, overwrite: bool) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        if overwrite:
            shutil.copytree(self.work / "base", out)
        return out


def committed_features(out: Path, index: int = 0, **options) -> np.ndarray | None:
    """The volume as the loader hands it to training (default settings unless `options` say
    otherwise), or None when none is committed."""
    from dinov3_cache.commit_protocol import is_volume_complete
    from dinov3_cache.loader.dataset import PreprocessedDINOv3Dataset

    if not is_volume_complete(out, index):
        return None
    dataset = PreprocessedDINOv3Dataset(out, [index], num_threads=2, **options)
    return dataset[0][0].numpy()


def debris_left(out: Path, index: int = 0) -> list[str]:
    from dinov3_cache.commit_protocol import partial_debris
    from dinov3_cache.paths import VolumePaths

    return [p.name for p in partial_debris(VolumePaths(out, index))]


def check_volume(c: Campaign, out: Path, expected_old: np.ndarray | None) -> tuple[np.ndarray | None, str | None]:
    """After a fault: one complete volume, old or new (or none where there was none)."""
    try:
        seen = committed_features(out)
    except Exception as e:  # noqa: BLE001 - any loader error here is a lost volume
        return None, f"the loader refuses the volume ({str(e).splitlines()[0]})"
    if seen is None and expected_old is not None:
        return None, "the old volume is gone"
    if seen is not None and not any(v is not None and np.array_equal(seen, v) for v in (expected_old, c.new)):
        return seen, "the volume is neither the old nor the new one"
    if seen is not None:
        verify = c.server.run(["--output-dir", str(out), "--indices", "0", "--verify-indices", "0"],
                              script="check_preprocessing")
        if verify.returncode != 0:
            return seen, f"--verify-indices exits {verify.returncode}"
    return seen, None


def check_rerun(c: Campaign, out: Path, extra: list[str]) -> str | None:
    """A rerun completes the volume and leaves no debris."""
    rerun = c.server.run(c.args(out, *extra))
    if rerun.returncode != 0:
        return f"the rerun exits {rerun.returncode}: {rerun.stderr.strip().splitlines()[-1:]}"
    if debris_left(out):
        return f"debris after a rerun: {debris_left(out)}"
    if not np.array_equal(committed_features(out), c.new):
        return "the rerun's volume differs from a clean run's"
    return None


def check_after_fault(c: Campaign, out: Path, overwrite: bool, result: RunResult) -> str | None:
    seen, problem = check_volume(c, out, c.old if overwrite else None)
    if problem is None and result.returncode == 0 and not np.array_equal(seen, c.new):
        problem = "the run exits 0 without the new volume"
    if problem is None and seen is not None and np.array_equal(seen, c.new) and not result.killed and result.returncode != 0:
        problem = f"the new volume is complete but the run exits {result.returncode}"
    return problem or check_rerun(c, out, ["--overwrite"] if overwrite else [])


def kill_sweep(c: Campaign, overwrite: bool, tally: Tally, sig: int = signal.SIGKILL) -> None:
    """Send `sig` at the k-th rename/unlink/rmdir, k = 1, 2, ... until the run finishes."""
    extra = ["--overwrite"] if overwrite else []
    for k in itertools.count(1):
        out = c.trial_dir(f"sweep_{int(overwrite)}_{sig}_{k}", overwrite)
        result = c.server.run(c.args(out, *extra), kill_at=k, sig=sig)
        # the run ended before its k-th call: no signal was sent, the sweep is over
        finished = not result.killed if sig == signal.SIGKILL else result.calls is not None and result.calls < k
        tally.trials += 0 if finished else 1
        problem = check_after_fault(c, out, overwrite, result)
        if problem:
            tally.failures.append(f"{signal.Signals(sig).name} at call {k}: {problem}")
        shutil.rmtree(out, ignore_errors=True)
        if finished or k >= MAX_CALLS:
            tally.notes = f"k = 1..{k - 1}: every call of the run"
            return


def random_kills(c: Campaign, trials: int, tally: Tally, seed: int = 0) -> None:
    """SIGKILL at a random instant of a normal run or an overwrite (alternately)."""
    rng = random.Random(seed)
    durations = {}
    for overwrite in (False, True):
        out = c.trial_dir("timing", overwrite)
        started = time.perf_counter()
        c.server.run(c.args(out, *(["--overwrite"] if overwrite else [])))
        durations[overwrite] = time.perf_counter() - started
    killed = 0
    for trial in range(trials):
        overwrite = bool(trial % 2)
        out = c.trial_dir(f"random_{trial}", overwrite)
        result = c.server.run(c.args(out, *(["--overwrite"] if overwrite else [])),
                              kill_after=rng.uniform(0, durations[overwrite]))
        tally.trials += 1
        killed += result.killed
        problem = check_after_fault(c, out, overwrite, result)
        if problem:
            tally.failures.append(f"random kill {trial}: {problem}")
        shutil.rmtree(out, ignore_errors=True)
    tally.notes = f"{killed} killed before the run ended"


def concurrent_runs(c: Campaign, trials: int, tally: Tally) -> None:
    """Two runs of one index started at once: one commits, the other exits 3 (or, when it
    only starts after the first finished, skips or commits after it); never a mix."""
    from dinov3_cache.errors import EXIT_LOCKED

    refused = 0
    for trial in range(trials):
        overwrite = bool(trial % 2)
        extra = ["--overwrite"] if overwrite else []
        out = c.trial_dir(f"concurrent_{trial}", overwrite)
        results = c.server.run_together([{"args": c.args(out, *extra)}, {"args": c.args(out, *extra)}])
        tally.trials += 1
        codes = sorted(r.returncode for r in results)
        committed = sum("complete:" in r.stdout for r in results)
        refused += codes == [0, EXIT_LOCKED]
        problem = None
        if codes not in ([0, 0], [0, EXIT_LOCKED]):
            problem = f"exit statuses {codes}"
        elif committed == 0 or (codes == [0, EXIT_LOCKED] and committed != 1) or (not overwrite and committed != 1):
            problem = f"{committed} runs committed (exit statuses {codes})"
        problem = problem or check_after_fault(c, out, overwrite, RunResult(0, None, "", ""))
        if problem:
            tally.failures.append(f"concurrent {trial}: {problem}")
        shutil.rmtree(out, ignore_errors=True)
    tally.notes = f"{refused} pairs overlapped (one exited {EXIT_LOCKED})"


# ----------------------------------------------------------------------------- damage

def damages(root: Path, several_chunks: bool = True):
    """(name, detected without checksums, damage) for each damage of volume 0 (chunks swapped
    within an array only where its features have several chunks: 0.0.0.0 and 0.1.1.1)."""
    from dinov3_cache.paths import VolumePaths

    v0, v1 = VolumePaths(root, 0), VolumePaths(root, 1)
    features0, features1 = v0.array("features"), v1.array("features")
    yield "deleted chunk", True, lambda: (features0 / "0.0.0.0").unlink()
    yield "flipped bytes", False, lambda: flip(features0 / "0.0.0.0", 100)
    yield "zeroed chunk", False, lambda: zero(features0 / "0.0.0.0")
    if several_chunks:
        yield "chunks swapped within an array", False, lambda: swap(features0 / "0.0.0.0", features0 / "0.1.1.1")
    yield "chunk from another volume", False, lambda: shutil.copy(features1 / "0.0.0.0", features0 / "0.0.0.0")
    yield "dtype <f2 -> <i2", True, lambda: edit(features0 / ".zarray", '"<f2"', '"<i2"')
    yield "order C -> F", True, lambda: edit(features0 / ".zarray", '"order":"C"', '"order":"F"')
    yield "NaNs in a chunk", False, lambda: nans(features0 / "0.0.0.0")
    yield "feature arrays swapped", True, lambda: swap(features0, features1)
    yield "array replaced under a forged commit id", False, lambda: replace_forged(v1, v0, "features")
    yield "volume 1 copied over volume 0's names", True, lambda: copy_volume_over(v1, v0)
    yield "gt chunk shape changed", True, lambda: edit(v0.array("gt") / ".zarray", '"chunks":[16,', '"chunks":[8,')


def damage_campaign(cache: Path, work: Path, default: Tally, always: Tally, checksum_only: Tally | None = None) -> None:
    """Each damage of a committed volume read with default settings and with
    verify_checksums=False. `default`: every kind, none may reach training; `always`: kinds
    checked without checksums, none may reach training with them off; `checksum_only`: kinds
    only checksums catch, read with them off (counted in its notes, not failures: it is the
    explicit opt-out; left out when None)."""
    from dinov3_cache.paths import VolumePaths

    clean = committed_features(cache, verify_checksums=False)
    several_chunks = (VolumePaths(cache, 0).array("features") / "0.1.1.1").is_file()
    copy = work / "damaged"
    delivered = 0
    for name, checked_always, damage in damages(copy, several_chunks):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(cache, copy)
        damage()
        for options, tally in (({}, default), ({"verify_checksums": False}, always if checked_always else checksum_only)):
            if tally is None:
                continue
            tally.trials += 1
            try:
                seen = committed_features(copy, **options)
            except Exception:  # noqa: BLE001 - refusing is the right answer
                continue
            what = "wrong values delivered silently" if not np.array_equal(seen, clean) else "damage not detected"
            if tally is checksum_only:
                delivered += 1
            else:
                tally.failures.append(f"{name} ({'default settings' if not options else 'verify_checksums=False'}): {what}")
        shutil.rmtree(copy, ignore_errors=True)
    if checksum_only is not None:
        checksum_only.notes = f"{delivered} of {checksum_only.trials} reach training (not counted: the default refuses them)"


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def replace_forged(source, target, array: str) -> None:
    """`source`'s array under `target`'s name, its attributes forged to say it is target's."""
    import json

    commit_id = json.loads(target.metadata.read_text())["integrity"]["commit_id"]
    shutil.rmtree(target.array(array))
    shutil.copytree(source.array(array), target.array(array))
    zattrs = target.array(array) / ".zattrs"
    attributes = json.loads(zattrs.read_text())
    attributes["dinov3_cache"].update(commit_id=commit_id, volume_index=target.volume_index)
    zattrs.write_text(json.dumps(attributes))


def copy_volume_over(source, target) -> None:
    """Every file of volume `source` copied over volume `target`'s names."""
    for path in target.existing_arrays():
        shutil.rmtree(path)
    for path in source.existing_arrays():
        shutil.copytree(path, target.output_dir / path.name.replace(source.name, target.name))
    shutil.copy(source.metadata, target.metadata)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def nans(path: Path) -> None:
    data = np.frombuffer(path.read_bytes(), np.float16).copy()
    data[:10] = np.nan
    path.write_bytes(data.tobytes())


def edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


def swap(a: Path, b: Path) -> None:
    aside = a.with_name(a.name + ".swap")
    a.rename(aside)
    b.rename(a)
    aside.rename(b)


# ----------------------------------------------------------------------------- full disk

def full_disk(c: Campaign, tally: Tally) -> None:
    """A 2 MiB tmpfs (root only): the refused run, the run that fills it, an overwrite that
    fills it: each exits 1 with one error line, the old volume stands, no debris is left."""
    mount = c.work / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        tally.notes = "skipped: mounting a tmpfs needs root"
        return
    try:
        big = ["--output-image-dim", "64", "--compression", "none"]
        for name, extra, overwrite in (("space check", [], False), ("no space check", ["--no-space-check"], False),
                                       ("overwrite, no space check", ["--no-space-check", "--overwrite"], True)):
            out = mount / "out"
            shutil.rmtree(out, ignore_errors=True)
            if overwrite:
                shutil.copytree(c.work / "base", out)
            result = c.server.run(c.args(out, *extra, *big))
            tally.trials += 1
            last = (result.stderr.strip().splitlines() or [""])[-1]
            seen, problem = check_volume(c, out, c.old if overwrite else None)
            if problem is None and (result.returncode != 1 or not last.startswith("error:")):
                problem = f"exit {result.returncode}, last line {last!r}"
            if problem is None and (seen is not None) != overwrite:
                problem = "a volume appeared" if seen is not None else "the old volume is gone"
            if problem is None and debris_left(out):
                problem = f"debris left: {debris_left(out)}"
            if problem:
                tally.failures.append(f"full disk, {name}: {problem}")
        shutil.rmtree(mount / "out", ignore_errors=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------- the table

def make_model(directory: Path) -> Path:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    config = DINOv3ViTConfig(patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_register_tokens=2)
    path = directory / "tiny-dinov3"
    DINOv3ViTModel(config).save_pretrained(path)
    return path


def campaign(work: Path, random_trials: int, concurrent_trials: int) -> dict[str, Tally]:
    tallies = {name: Tally() for name in (
        "SIGKILL at each call, normal run", "SIGKILL at each call, overwrite", "SIGKILL at a random time",
        "SIGTERM at each call, overwrite", "two runs of one index at once", "damage: silently wrong, default settings",
        "damage, verify_checksums=False, always-checked kinds", "damage, verify_checksums=False, checksum-only kinds",
        "full disk (2 MiB tmpfs)")}
    t = list(tallies.values())
    with ForkServer(work / "server") as server:
        c = Campaign(server, work, make_model(work)).prepare()
        kill_sweep(c, False, t[0])
        kill_sweep(c, True, t[1])
        random_kills(c, random_trials, t[2])
        kill_sweep(c, True, t[3], sig=signal.SIGTERM)
        concurrent_runs(c, concurrent_trials, t[4])
        cache = work / "cache"
        for index in (0, 1):  # 8 feature chunks each: chunks can be swapped within an array
            server.run(c.args(cache, *DAMAGE_CHUNKS, index=index))
        damage_campaign(cache, work, t[5], t[6], t[7])
        full_disk(c, t[8])
    return tallies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=40, help="kills at random times (default 40)")
    parser.add_argument("--concurrent", type=int, default=20, help="pairs of runs of one index at once (default 20)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tallies = campaign(Path(tmp), args.random, args.concurrent)
    except FaultInjectionUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("| category | trials | failures | notes |\n| --- | ---: | ---: | --- |")
    for name, tally in tallies.items():
        print(f"| {name} | {tally.trials} | {len(tally.failures)} | {tally.notes} |")
    for name, tally in tallies.items():
        for failure in tally.failures:
            print(f"{name}: {failure}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 1 if any(t.failures for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
