"""A DINOv3 feature cache for electron-microscopy volumes. `open_volume` (one cached volume as
an xarray.Dataset) is imported on first use, so importing the package stays light."""


def __getattr__(name: str):
    if name == "open_volume":
        from dinov3_cache.xarray_view import open_volume

        return open_volume
    raise AttributeError(f"module 'dinov3_cache' has no attribute {name!r}")


__all__ = ["open_volume"]
