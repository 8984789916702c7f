"""python -m dinov3_cache.sources.cellmap --data-root ROOT --output-dir OUT: build (or
refresh) a data root's catalog once and save it in the output directory."""

from __future__ import annotations

import sys
from pathlib import Path

from dinov3_cache.errors import EXIT_OK, OneLineParser, report_error
from dinov3_cache.sources.base import SourceError
from dinov3_cache.sources.cellmap.catalog import CATALOG_FILE_NAME
from dinov3_cache.sources.cellmap.source import CELLMAP_OPTIONS, CellMapSource

SCAN_OPTIONS = ("data_root", "s3_endpoint")  # the source options a scan needs, as the extraction declares them


def main(argv: list[str] | None = None) -> int:
    """Build (or refresh) the catalog of a data root once and save it in the output directory."""
    parser = OneLineParser(prog="python -m dinov3_cache.sources.cellmap", description=main.__doc__)
    for option in CELLMAP_OPTIONS:
        if option.dest in SCAN_OPTIONS:
            option.add_to(parser)
    parser.add_argument("--output-dir", required=True, help=f"where {CATALOG_FILE_NAME} is written")
    args = parser.parse_args(argv)
    try:
        source = CellMapSource.from_settings({**vars(args), "refresh_catalog": True})
    except SourceError as e:
        return report_error(e)
    catalog = source.catalog
    n_crops = sum(len({entry.crop for entry in d.labels}) for d in catalog.datasets)
    print(
        f"catalog of {catalog.root}: {len(catalog.datasets)} dataset(s), {n_crops} label set(s), "
        f"organelles {', '.join(catalog.organelles())}; saved to {Path(args.output_dir) / CATALOG_FILE_NAME}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
