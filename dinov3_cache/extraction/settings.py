"""The settings of a volume's extraction, declared once: `ExtractionSettings`.

Each field is one command-line option: its type (the annotation), its default and its help
text (the field's metadata). The argparse options of preprocess_volume.py and
submit_preprocessing_jobs.py are built from these fields, a submission writes the settings
once to a file every job reads (`write_settings_file`), and `ExtractionSettings.config`
turns them into the `ExtractionConfig` of one volume.

Defaults of values that a shared type owns (crop geometry, sampling filters, storage) are
read from that type, so each default has one definition. Each data source declares its own
options (`sources/registry.py` lists them); those every job receives travel in `source_options`.

Precedence, highest first: the command line, the settings file (--settings), the defaults.
Each flag has its opposite (`Switch`: --save-raw / --no-save-raw), so the command line can
also turn off what a settings file turned on.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dinov3_cache.directories import directory_problem
from dinov3_cache.errors import CacheToolError, UsageError, first_line
from dinov3_cache.extraction.config import PLANES, ExtractionConfig
from dinov3_cache.geometry import CropGeometry
from dinov3_cache.indices import parse_index_list
from dinov3_cache.paths import LOGS_DIR
from dinov3_cache.records import write_json_atomic
from dinov3_cache.sources.base import LabelFilters, SamplingOptions
from dinov3_cache.sources.registry import add_source_arguments, pass_through_options, source_choice_help
from dinov3_cache.storage import DEFAULT_STORAGE_FORM, RegisteredNames, storage_for, storage_form_names
from dinov3_cache.switch import Switch
from dinov3_cache.zarr_arrays import COMPRESSIONS, ZARR_FORMATS, StorageOptions, parse_chunks

DEFAULT_MODEL_ID = "facebook/dinov3-vitl16-pretrain-sat493m"
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
SETTINGS_FORMAT = "dinov3_cache.extraction_settings"
SETTINGS_VERSION = 1
COMPILE_CACHE_DIR = "compile_cache"  # under logs/ by default: shared by the jobs of a cache
MAX_OUTPUT_IMAGE_DIM = 1024  # 1024^3 voxels of 1024 float16 channels are 2 TiB per volume already
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")  # what resolve_device accepts, checked without torch
FINITE_OPTIONS = ("base_resolution", "min_resolution_for_raw", "min_label_fraction", "min_ground_truth_fraction")


class SettingsError(UsageError):
    """A settings file that cannot be used; nothing was done."""


def option(default: Any, help: str | None = None, **argparse_kwargs: Any) -> Any:
    """A settings field that is also a command-line option (--name-with-dashes)."""
    return field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class ExtractionSettings:
    """Every option of one volume's extraction except --volume-index."""

    output_dir: str | None = option(None, "cache directory (created if missing)", required=True)
    source: str | None = option(None, source_choice_help())
    organelles: tuple[str, ...] = option(
        SamplingOptions.organelles, "label names; one keeps instance ids, several become classes", nargs="+"
    )
    base_resolution: float = option(CropGeometry.base_resolution, "label voxel size in nm (default %(default)g)")
    min_resolution_for_raw: float = option(CropGeometry.min_resolution_for_raw, "raw voxel size in nm (default %(default)g)")
    output_image_dim: int = option(CropGeometry.output_image_dim, "label voxels per axis (default %(default)s)")
    inference_filter: tuple[str, ...] = option(
        SamplingOptions.inference_filter, "datasets whose inference labels are used", nargs="*"
    )
    crop_filter: tuple[str, ...] = option(SamplingOptions.crop_filter, "only these ground-truth crops", nargs="*")
    min_label_fraction: float = option(LabelFilters.min_label_fraction)
    min_unique_ids: int = option(LabelFilters.min_unique_ids)
    min_ground_truth_fraction: float = option(LabelFilters.min_ground_truth_fraction)
    no_gt_extension: bool = option(not SamplingOptions.gt_extension, "keep crops inside the annotated box (no mask written)")
    compression: str = option(
        StorageOptions.compression, "chunk compression; the bare flag means lz4 (default %(default)s)",
        nargs="?", const="lz4", choices=COMPRESSIONS,
    )
    num_threads: int = option(StorageOptions.num_threads, "TensorStore I/O and copy threads (default %(default)s)")
    model_id: str = option(
        DEFAULT_MODEL_ID, "Hugging Face id or local directory of a DINOv3 ViT; 'random:tiny' builds an offline demo model"
    )
    model_revision: str | None = option(None, "hub revision (branch, tag or commit) of --model-id")
    planes: tuple[str, ...] = option(PLANES, "slicing planes, averaged (default all)", nargs="+", choices=PLANES)
    batch_size: int = option(8, "slices per forward pass (default %(default)s)")
    features_dtype: str = option("float16", None, choices=FEATURE_DTYPES)
    chunks: str = option(
        "auto", "feature chunk shape, 4 numbers: " + " or ".join(
            f"'{f.chunk_axes}' ({f.name}, auto: {','.join(map(str, f.default_chunks))})"
            for f in map(storage_for, storage_form_names()))
    )
    zarr_format: int = option(StorageOptions.zarr_format, "2 (default) or 3 (sharded, crc32c)", choices=ZARR_FORMATS)
    save_raw: bool = option(False, "also write volume_XXXXXX_raw.zarr at slice resolution")
    overwrite: bool = option(False, "replace a complete volume (the old one stays valid until then)")
    no_space_check: bool = option(False, "start even when the output file system has less free space than the volume needs")
    device: str = option("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    compile: bool = option(False, "torch.compile the model (same features; worth it for many volumes per job)")
    compile_cache: str | None = option(
        None, "persistent compilation cache shared by every job (default with --compile: OUTPUT_DIR/logs/compile_cache)"
    )
    layout: str = option(
        DEFAULT_STORAGE_FORM, "feature storage form: " + ", or ".join(
            f"'{f.name}' ({f.description})" for f in map(storage_for, storage_form_names())) + " (default %(default)s)",
        choices=RegisteredNames(),
    )
    # the data sources' options that every job receives (each source declares its own), by argparse dest
    source_options: Mapping[str, Any] = field(default_factory=dict, metadata={"argparse": None})

    def config(self, volume_index: int) -> ExtractionConfig:
        """The ExtractionConfig of one volume. A bad value raises a UsageError: it is found
        before any work starts."""
        try:
            return self._config(volume_index)
        except UsageError:
            raise
        except CacheToolError as e:
            raise UsageError(first_line(e)) from None

    def _config(self, volume_index: int) -> ExtractionConfig:
        self.check_values()
        return ExtractionConfig(
            volume_index=volume_index,
            output_dir=Path(self.output_dir),
            model_id=self.model_id,
            model_revision=self.model_revision,
            geometry=CropGeometry(self.base_resolution, self.min_resolution_for_raw, self.output_image_dim),
            sampling=SamplingOptions(
                organelles=tuple(self.organelles),
                filters=LabelFilters(self.min_label_fraction, self.min_unique_ids, self.min_ground_truth_fraction),
                gt_extension=not self.no_gt_extension,
                crop_filter=tuple(self.crop_filter),
                inference_filter=tuple(self.inference_filter),
            ),
            storage=StorageOptions(
                zarr_format=self.zarr_format,
                compression=self.compression,
                feature_chunks=parse_chunks(self.chunks),
                num_threads=self.num_threads,
            ),
            planes=tuple(self.planes),
            batch_size=self.batch_size,
            features_dtype=self.features_dtype,
            save_raw=self.save_raw,
            overwrite=self.overwrite,
            device=self.device,
            space_check=not self.no_space_check,
            storage_form=storage_for(self.layout),
        )

    def check_values(self) -> None:
        """Values no later step checks before work starts (UsageError, one line each)."""
        if self.output_dir is None:
            raise UsageError("--output-dir is required")
        problem = directory_problem(self.output_dir)
        if problem:
            raise UsageError(f"--output-dir {problem}")
        for name in FINITE_OPTIONS:
            if not math.isfinite(getattr(self, name)):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.output_image_dim > MAX_OUTPUT_IMAGE_DIM:
            raise UsageError(
                f"--output-image-dim must be at most {MAX_OUTPUT_IMAGE_DIM} (a volume's features grow with its cube), "
                f"got {self.output_image_dim}"
            )
        if self.features_dtype not in FEATURE_DTYPES:
            raise UsageError(f"--features-dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.features_dtype!r}")
        if not isinstance(self.device, str) or not DEVICE_NAME.fullmatch(self.device):
            raise UsageError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")

    def compile_cache_dir(self) -> Path | None:
        """Where compiled kernels are kept between processes (None without --compile)."""
        if not self.compile:
            return None
        return Path(self.compile_cache) if self.compile_cache else Path(self.output_dir) / LOGS_DIR / COMPILE_CACHE_DIR

    def values(self) -> dict[str, Any]:
        """Every option by argparse dest, source options included: what a settings file holds."""
        values = {f.name: _plain(getattr(self, f.name)) for f in cli_fields()}
        return {**values, **{k: _plain(v) for k, v in self.source_options.items()}}


# ----------------------------------------------------------------------------- argparse


def cli_fields() -> list:
    return [f for f in fields(ExtractionSettings) if f.metadata.get("argparse") is not None]


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ExtractionSettings)


def argparse_kwargs(f) -> dict[str, Any]:
    """The add_argument keywords of one settings field, derived from its type and metadata."""
    kwargs = {"help": f.metadata["help"], **f.metadata["argparse"]}
    kind, _ = _base_type(_field_types()[f.name])
    if kind is bool:  # with its opposite (--no-save-raw), which undoes a settings file's value
        return {**kwargs, "action": Switch, "default": f.default}
    if typing.get_origin(kind) is tuple:
        return {"type": typing.get_args(kind)[0], "default": list(f.default), **kwargs}
    return {"type": kind, "default": f.default, **kwargs}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); X -> (X, False)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return annotation, False


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """Every extraction option except --volume-index, with the source's own options."""
    for f in cli_fields():
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **argparse_kwargs(f))
    add_source_arguments(parser)


@functools.cache
def source_option_actions() -> dict[str, argparse.Action]:
    """The sources' options that every job receives (by dest); --refresh-catalog is not one."""
    scratch = argparse.ArgumentParser(add_help=False)
    return {option.dest: option.add_to(scratch) for option in pass_through_options()}


def settings_from_args(args: argparse.Namespace) -> ExtractionSettings:
    """The settings of parsed options (parsed with add_extraction_arguments)."""
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    source_options = {dest: getattr(args, dest, action.default) for dest, action in source_option_actions().items()}
    return ExtractionSettings(**values, source_options=source_options)


def config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    """The ExtractionConfig for parsed preprocess_volume.py options naming one volume."""
    given = args.volume_index if isinstance(args.volume_index, list) else [args.volume_index]
    indices = parse_index_list(given, "--volume-index")
    if len(indices) != 1:
        raise UsageError(f"--volume-index names {len(indices)} volumes here; this needs exactly one")
    return settings_from_args(args).config(indices[0])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- settings file


def write_settings_file(path: Path, settings: ExtractionSettings) -> None:
    write_json_atomic(path, settings_document(settings))


def settings_document(settings: ExtractionSettings) -> dict:
    return {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, "settings": settings.values()}


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The option values of a settings file, checked: known keys, values of the right type."""
    try:
        with open(path) as f:
            document = json.load(f)
    except OSError as e:
        raise SettingsError(f"cannot read settings file {path} ({e.strerror}); pass the file a submission wrote") from None
    except json.JSONDecodeError as e:
        raise SettingsError(f"settings file {path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != SETTINGS_FORMAT:
        raise SettingsError(f"{path} is not a settings file (no \"format\": \"{SETTINGS_FORMAT}\")")
    if document.get("version") != SETTINGS_VERSION:
        raise SettingsError(f"settings file {path} has version {document.get('version')!r}; this code reads version {SETTINGS_VERSION}")
    values = document.get("settings")
    if not isinstance(values, dict):
        raise SettingsError(f"settings file {path} has no \"settings\" object")
    known = {f.name: f for f in cli_fields()}
    unknown = sorted(set(values) - set(known) - set(source_option_actions()))
    if unknown:
        raise SettingsError(f"settings file {path} has unknown key(s) {', '.join(unknown)}; known: {', '.join([*known, *source_option_actions()])}")
    for name, value in values.items():
        _check_value(path, name, value, known.get(name))
    return values


def _check_value(path: str | Path, name: str, value: Any, f) -> None:
    """A file value must be what the command line would have produced for that option."""
    if f is None:  # a source option: a string, or a flag
        action = source_option_actions()[name]
        expected = bool if isinstance(action, Switch) else (str, type(None))
        if not isinstance(value, expected):
            raise SettingsError(f"settings file {path}: {name} = {value!r} has the wrong type")
        return
    kind, optional = _base_type(_field_types()[name])
    choices = f.metadata["argparse"].get("choices")
    if value is None and optional:
        return
    items, kind = (value, typing.get_args(kind)[0]) if typing.get_origin(kind) is tuple else ([value], kind)
    if typing.get_origin(_field_types()[name]) is tuple and not isinstance(value, list):
        raise SettingsError(f"settings file {path}: {name} must be a list, got {value!r}")
    for item in items:
        if not _is_instance(item, kind) or (choices and item not in choices):
            wanted = f"one of {', '.join(map(str, choices))}" if choices else kind.__name__
            raise SettingsError(f"settings file {path}: {name} must be {wanted}, got {item!r}")


def _is_instance(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def apply_settings_file(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> None:
    """Make a settings file's values the parser's defaults: the command line still wins."""
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values and values[action.dest] is not None:
            action.required = False
