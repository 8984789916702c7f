"""python -m dinov3_cache.sources.cellmap --data-root ROOT --output-dir OUT: build (or
refresh) a data root's catalog once and save it in the output directory."""

from __future__ import annotations

import sys
from pathlib import Path

from dinov3_cache.errors import OneLineParser, report_error
from dinov3_cache.sources.base import DATA_ROOT_ENV, SourceError
from dinov3_cache.sources.cellmap.catalog import CATALOG_FILE_NAME
from dinov3_cache.sources.cellmap.source import source_from_args


def main(argv: list[str] | None = None) -> int:
    """Build (or refresh) the catalog of a data root once and save it in the output directory."""
    parser = OneLineParser(prog="python -m dinov3_cache.sources.cellmap", description=main.__doc__)
    parser.add_argument("--data-root", default=None, help=f"directory or s3://bucket/prefix (default ${DATA_ROOT_ENV})")
    parser.add_argument("--output-dir", required=True, help=f"where {CATALOG_FILE_NAME} is written")
    parser.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    args.refresh_catalog = True
    try:
        source = source_from_args(args)
    except SourceError as e:
        return report_error(e)
    catalog = source.catalog
    n_crops = sum(len({entry.crop for entry in d.labels}) for d in catalog.datasets)
    print(
        f"catalog of {catalog.root}: {len(catalog.datasets)} dataset(s), {n_crops} label set(s), "
        f"organelles {', '.join(catalog.organelles())}; saved to {Path(args.output_dir) / CATALOG_FILE_NAME}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
