"""Several volumes in one process: the model loads once, the next volume's crop is read in
the background while the current one is extracted, and each volume's last writes and commit
run on another thread while the next one is computed. Each volume keeps its own lock, status
record, debris rules and outcome; one failed volume does not stop the others.

The process's exit status (`exit_status`): 0 when every volume completed or was skipped, 1
when any failed, else 3 when some were held by another run (and the rest succeeded).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from dinov3_cache.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_OK, CacheToolError, first_line, named_first_line
from dinov3_cache.extraction.commit import VolumeOutcome
from dinov3_cache.extraction.config import ExtractionConfig
from dinov3_cache.extraction.model import ExecutionOptions, LoadedModel
from dinov3_cache.extraction.pipeline import (
    ExtractedVolume,
    ModelOnDemand,
    read_now,
    start_volume,
)
from dinov3_cache.extraction.signals import Terminated, raise_on_sigterm
from dinov3_cache.locks import VolumeLocked
from dinov3_cache.sources.base import SourceCrop, VolumeSource

log = logging.getLogger("dinov3_preprocessing")


@dataclass
class VolumeResult:
    volume_index: int
    state: str  # complete | skipped | failed | locked
    message: str  # for failures: the error's first line, without the volume index
    outcome: VolumeOutcome | None = None
    status: int = EXIT_OK  # this volume's own exit status (docs/exit-status.md)

    @property
    def succeeded(self) -> bool:
        return self.state in ("complete", "skipped")


def preprocess_volumes(
    configs: Sequence[ExtractionConfig],
    source: VolumeSource,
    execution: ExecutionOptions = ExecutionOptions(),
    report: Callable[[VolumeResult], None] = lambda result: None,
    overlap_commits: bool = True,
    loaded: LoadedModel | None = None,
) -> list[VolumeResult]:
    """Extract each volume in turn with one model; `report` hears each result as it comes, in
    order. Termination (SIGTERM, Ctrl-C) stops the run: the volume being computed records the
    failure, one being committed completes, and the remaining ones are not started.
    `overlap_commits=False` finishes each volume before the next starts (a benchmark's baseline);
    `loaded`: a model already loaded, else it loads when first needed."""
    if not configs:
        return []
    model = ModelOnDemand(configs[0], loaded, execution)
    results: list[VolumeResult] = []

    def deliver(result: VolumeResult) -> None:
        results.append(result)
        report(result)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit") as committer:
        pending: Future[SourceCrop] | None = None  # the next crop; the first is read in its own lock, as for one volume
        finishing: Future[VolumeResult] | None = None  # the previous volume's last writes and commit
        extracted: ExtractedVolume | None = None  # computed here, not yet handed on
        try:
            for position, config in enumerate(configs):
                if position and threading.current_thread() is threading.main_thread():
                    raise_on_sigterm()  # re-armed after the previous commit held it; raises one that arrived
                current = pending
                pending = None
                if position + 1 < len(configs):  # overlaps this volume's extraction
                    pending = read_in_background(reader, source, configs[position + 1])
                read_crop = current.result if current is not None else partial(read_now, source, config)
                started = result_of(config.volume_index, partial(start_volume, config, source, model, read_crop))
                if isinstance(started, ExtractedVolume):
                    extracted = started
                if finishing is not None:
                    deliver(finishing.result())
                    finishing = None
                if extracted is None:
                    deliver(started)
                    continue
                volume, extracted = extracted, None  # handed on before it runs: never finished twice
                if overlap_commits and position + 1 < len(configs):
                    finishing = committer.submit(finish_volume, volume)
                else:  # the last one on this thread, where a SIGTERM during its commit is held (exit 0)
                    deliver(finish_volume(volume))
        except BaseException as stopping:
            if pending is not None:
                pending.cancel()
            if extracted is not None:
                extracted.abandon(stopping)
            if finishing is not None:
                deliver(finishing.result())  # a volume already being committed completes
            raise
    return results


def read_in_background(reader: ThreadPoolExecutor, source: VolumeSource, config: ExtractionConfig) -> Future[SourceCrop]:
    return reader.submit(read_now, source, config)


def finish_volume(volume: ExtractedVolume) -> VolumeResult:
    return result_of(volume.config.volume_index, volume.finish)


def result_of(index: int, action: Callable[[], VolumeOutcome | ExtractedVolume]) -> VolumeResult | ExtractedVolume:
    """What `action` gives for volume `index`: an extracted volume, or the volume's result, its
    failures included (a termination stops the whole run instead)."""
    try:
        outcome = action()
    except VolumeLocked as e:
        return VolumeResult(index, "locked", f"volume {index} is being processed by another run ({e}); not starting a second",
                            status=e.exit_status)
    except CacheToolError as e:
        return VolumeResult(index, "failed", first_line(e, limit=2000), status=e.exit_status)
    except Terminated:
        raise
    except Exception as e:  # not a known failure: the traceback goes to the log, the next volume still runs
        log.exception("volume %d failed", index)
        return VolumeResult(index, "failed", named_first_line(e), status=EXIT_FAILED)
    if isinstance(outcome, ExtractedVolume):
        return outcome
    return VolumeResult(index, outcome.state, outcome.message, outcome)


def exit_status(results: Sequence[VolumeResult]) -> int:
    """One volume: its own status. Several: 1 if any failed, else 3 if any was locked, else 0."""
    if len(results) == 1:
        return results[0].status
    if any(r.state == "failed" for r in results):
        return EXIT_FAILED
    if any(r.state == "locked" for r in results):
        return EXIT_LOCKED
    return EXIT_OK


def summary_line(results: Sequence[VolumeResult]) -> str:
    counts = {state: sum(r.state == state for r in results) for state in ("complete", "skipped", "failed", "locked")}
    return f"volumes: {len(results)} done here: " + ", ".join(f"{n} {state}" for state, n in counts.items())
