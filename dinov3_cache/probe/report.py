"""The probe's table (printed), its rows as JSON, and one PNG of a test slice: raw, labels,
and each probe's prediction (drawn with the audit's PNG writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinov3_cache.audit.png import compose, write_png
from dinov3_cache.audit.previews import PREVIEW_PANEL_PIXELS, grey_rgb, label_rgb
from dinov3_cache.indices import format_ranges
from dinov3_cache.probe.run import ProbeResult
from dinov3_cache.records import write_json_atomic


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(result: ProbeResult) -> str:
    """Header, one line per row (mean IoU, accuracy, then IoU/F1 per class), and the timing."""
    plan = result.plan
    cache = next(iter(plan.train))
    train, test = [v.index for v in plan.train[cache]], [v.index for v in plan.test[cache]]
    lines = [
        f"linear probe: train volumes {format_ranges(train)}, test volumes {format_ranges(test)} "
        f"({result.rows[0]['voxels']:,} labelled test voxels), {plan.options.steps} steps of "
        f"{plan.options.batch_size} crops {'x'.join(map(str, plan.crop_size))}, seed {plan.options.seed}",
    ]
    width = max(len(r["name"]) for r in result.rows) + 2
    header = f"{'':{width}}{'kind':10}{'mean IoU':>9}{'accuracy':>10}" + "".join(
        f"{name + ' IoU/F1':>{max(16, len(name) + 10)}}" for name in plan.classes.names)
    lines.append(header)
    for row in result.rows:
        if row.get("reachable") is False:
            lines.append(f"{row['name']:{width}}{row['kind']:10}  {row['note']}")
            continue
        line = f"{row['name']:{width}}{row['kind']:10}{number(row['mean_iou']):>9}{number(row['accuracy']):>10}"
        for name in plan.classes.names:
            c = row["per_class"][name]
            line += f"{number(c['iou']) + '/' + number(c['f1']):>{max(16, len(name) + 10)}}"
        lines.append(line)
    for name, timing in result.timings.items():
        lines.append(f"training {name}: {timing.steps} steps, {timing.per_step_ms:.1f} ms/step, "
                     f"{100 * timing.waiting_share:.0f} % of it waiting for data")
    return "\n".join(lines)


def write_rows(result: ProbeResult, path: Path) -> None:
    write_json_atomic(Path(path), result.rows)


def write_slice_png(result: ProbeResult, path: Path) -> Path:
    """The middle z slice of the first test volume: raw (when reachable), labels, each prediction."""
    index = next(iter(result.test_targets))
    target = result.test_targets[index]
    z = target.shape[0] // 2
    panels = []
    if index in result.test_raw:
        panels.append(("raw", grey_rgb(result.test_raw[index][z], 0, 1)))
    panels.append(("labels", label_rgb(np.where(target[z] < 0, 0, target[z]))))
    for name, predictions in result.predictions.items():
        if name != "majority class":
            panels.append((name, label_rgb(predictions[index][z])))
    header = f"probe: test volume {index}  z {z}/{target.shape[0]}  (black: background or unknown)"
    return write_png(Path(path), compose(panels, header, PREVIEW_PANEL_PIXELS))


def write_predictions(result: ProbeResult, directory: Path) -> None:
    """Each row's test predictions as rowK_volume_XXXXXX.npy, K its position in the rows."""
    for k, row in enumerate(result.rows):
        for index, prediction in result.predictions.get(row["name"], {}).items():
            Path(directory).mkdir(parents=True, exist_ok=True)
            np.save(Path(directory) / f"row{k}_volume_{index:06d}.npy", prediction)
