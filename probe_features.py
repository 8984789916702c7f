#!/usr/bin/env python
"""Linear probe of a feature cache: per-class IoU and F1 of a 1x1x1 convolution trained on the
cached features, beside the majority class and the same probe on raw intensity and filters.

    python probe_features.py --cache OUT --train-indices 0-15 --test-indices 16-19
    python probe_features.py --cache OUT_vitl OUT_vitb OUT_tokens --json probe.json --png probe.png

Exit status (docs/exit-status.md): 0 the table was printed; 1 a read failed (e.g. a damaged
chunk); 2 bad arguments or caches that cannot be probed (nothing was trained). See docs/probe.md.
"""

import sys

from dinov3_cache.interrupt import ctrl_c_exits_at_once, run_script

with ctrl_c_exits_at_once(__name__):  # torch loads here (seconds): Ctrl-C meanwhile is one line, exit 130
    from dinov3_cache.probe import build_parser, main, run_probe

__all__ = ["run_probe", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(run_script(main))
