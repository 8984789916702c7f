"""A newcomer's first run: demo.sh end to end (as CI runs it, the requirements already
installed), and the first errors one meets: a model that cannot be found, a bad option value."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_script


def run_demo(output_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "demo.sh"), str(output_dir)], capture_output=True, text=True, timeout=600, cwd="/",
        env={**os.environ, "DEMO_SKIP_INSTALL": "1", "PYTHON": sys.executable},
    )


def test_demo_reports_each_volume_and_ends_with_what_you_have_now(tmp_path):
    out = tmp_path / "demo_cache"
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout

    # one line per volume as it commits, before the summary, with stdout piped
    volume_lines = re.findall(r"^volume (\d): completed in [0-9.]+ s$", stdout, re.MULTILINE)
    assert sorted(volume_lines) == ["0", "1", "2", "3"]
    assert stdout.index("volume 3: completed") < stdout.index("summary: 4 completed, 0 skipped (already complete), 0 failed")
    assert "Result: OK: every expected volume is complete and verified" in stdout
    assert stdout.count("batch: features (2, 192, 32, 32, 32) torch.float32 | gt (2, 32, 32, 32) torch.int64") == 2

    probe = stdout.index("== what the features are worth")
    block = stdout[stdout.index("== what you have now"):probe].strip().splitlines()
    preview = out / "previews" / "volume_000000_preview.png"
    assert block[1] == f"cache:    {out}  (4 volumes; files per volume: docs/cache-format.md)"
    assert block[2].startswith(f"preview:  {preview}  ")
    assert preview.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert block[3] == f"viewer:   {sys.executable} check_preprocessing.py --output-dir {out} --view 0"
    assert block[4] == f"training: (from this directory, {REPO})"
    training = [line.strip() for line in block[5:8]]
    assert training == [
        "from preprocessed_dataloader import create_preprocessed_dataloader",
        f'loader = create_preprocessed_dataloader("{out}", batch_size=2, shuffle=True)',
        "for features, gt, mask in loader: ...",
    ]
    assert block[8].startswith("next:") and len(block) == 9  # the block closes the summary
    # the demo ends with the probe table of its own cache (docs/probe.md)
    table = stdout[probe:].strip().splitlines()
    assert re.match(r"demo_cache +features +[0-9.]+ +[0-9.]+ ", table[4]) and table[5].startswith("majority class")
    assert table[-1].startswith("training raw + filters: 100 steps") and (out / "probe.png").is_file()

    # the printed lines work as printed
    snippet = "\n".join(training[:2]) + "\nprint(sum(1 for _ in loader))"
    loaded = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert loaded.stdout.strip() == "2", loaded.stderr


# ----------------------------------------------------------------------------- a model that cannot be found


@pytest.mark.parametrize("hub_env, cause", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 forbids downloading it"),
    # a port nothing listens on: the hub does not answer, as on a machine without network
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "is unreachable"),
])
def test_unknown_model_fails_with_one_line_that_says_how_to_supply_it(tmp_path, hub_env, cause):
    result = run_script("preprocess_volume.py", "--volume-index", "0", "--output-dir", tmp_path / "out",
                        "--source", "synthetic", "--model-id", "nobody/no-such-dinov3", "--output-image-dim", "32",
                        env=hub_env)
    assert result.returncode == 2  # the model check refuses it before any work
    output = result.stdout + result.stderr
    assert "Retrying" not in output and "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: cannot read the config of model 'nobody/no-such-dinov3' (not in the local Hugging Face cache, and")
    assert cause in errors[0]
    for way in ("a local directory", "where the Hugging Face hub is reachable", "HF_HUB_OFFLINE=1", "random:tiny"):
        assert way in errors[0]


# ----------------------------------------------------------------------------- a bad option value


@pytest.mark.parametrize("command", [
    ["preprocess_volume.py", "--volume-index", "0", "--output-dir", "OUT", "--planes", "ab"],
    ["submit_preprocessing_jobs.py", "--num-volumes", "2", "--output-dir", "OUT", "--zarr-format", "4"],
    ["check_preprocessing.py", "--output-dir", "OUT", "--num-volumes", "x"],
    ["preprocessed_dataloader.py", "--preprocessed-dir", "OUT", "--batch-size", "x"],
    ["-m", "dinov3_cache.sources.cellmap", "--output-dir", "OUT", "--bogus"],
])
def test_a_bad_option_value_is_one_error_line_and_status_2(tmp_path, command):
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in command]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "usage:" not in result.stderr
    assert not (tmp_path / "out").exists()
