"""A fast CPU path for `features_from_tokens` (the one definition, which stays the reference;
tests/test_token_kernel.py checks that both agree to float32 rounding).

The reference builds each plane as a full-size float32 (C, D, H, W) intermediate and adds it to
the total: about ten bytes of memory traffic per byte delivered. Here the output is built in
tiles of a few MB (whole channels when one fits, else a slab of one channel's z slices: either
way a contiguous piece of the output), each written once, by one batched product, straight into
a contiguous float32 output (else into a scratch tile copied, cast, once). The mean over the
planes is folded into the interpolation matrices.

Per plane, with the tile's rows of the interpolation matrices (W: outputs x tokens, the same
matrices `features_from_tokens` uses) and tokens T (C, n, ga, gb) in the stored layout:
    xy (normal z; y, x):  tile[c, z] = (W_y @ T[c, z]) @ W_x^T   (last product over x)
    xz (normal y; z, x):  tile[c] = (W_z T[c] over z) @ W_x^T    (last product over x)
    yz (normal x; z, y):  tile[c, z] = W_y @ (W_z T[c] over z)   (last product over y)
The three last products are one: for each (channel, slice) pair b of the tile,
    tile[b] = [rows_b | W_y] @ [W_x^T ; U_b]
with rows_b the xy and xz rows added (they share W_x) and U_b the yz columns: one pass over the
tile (a sum of separate products writes the tile, then reads it back to add the next).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from dinov3_cache.storage.planes import PLANE_AXES
from dinov3_cache.storage.upsampling import interpolation_matrix

# float32 tile. Each tile costs a few torch calls whatever its size, and with several threads the
# Python between them runs one at a time: with two threads, 64^3 crops from 16^2 grids took
# 0.84-0.90x the time with 8 MB tiles as with 4 MB ones, 1.6x with 1 MB; from 32^2 grids 4 and
# 8 MB are alike (0.99-1.03x), on a 2-core VM with 2 MB of L2 per core
# (benchmarks/bench_token_kernel.py; docs/benchmarks.md, "Layouts: dense or tokens").
TILE_BYTES = 8 * 2**20
# The tiles' products are small: torch's intra-op threads would meet at a barrier after each
# one (costly when the cores are shared). Instead the channel blocks are shared among
# torch.get_num_threads() threads, each running its products on one core; the thread count is
# process-wide in torch, so it is set to 1 (and restored) under this lock for the duration.
_THREADS_LOCK = threading.Lock()


class ReusedMemory:
    """float32 buffers lent to each build and returned after it: a fresh buffer of a few MB costs
    a page fault per 4 KiB on its first use (about 2,300 for a C = 256, 64^3 crop)."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self) -> Iterator[Callable[[int], torch.Tensor]]:
        """take(n) -> n float32 elements (1-d, contents undefined); returned when the block ends."""
        taken: list[torch.Tensor] = []

        def take(numel: int) -> torch.Tensor:
            with self.lock:
                fits = [i for i, t in enumerate(self.free) if t.numel() >= numel]
                buffer = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
            taken.append(buffer if buffer is not None else torch.empty(numel))
            return taken[-1][:numel]

        try:
            yield take
        finally:
            with self.lock:
                self.free = (self.free + taken)[-self.keep :]


MEMORY = ReusedMemory()  # one per process


def tile_shape(channels: int, dz: int, slice_voxels: int) -> tuple[int, int]:
    """(channels, z slices) of one tile of about TILE_BYTES: whole channels when one fits, else
    a slab of one channel's slices; either way a contiguous piece of a (C, D, H, W) output."""
    if 4 * slice_voxels * dz <= TILE_BYTES:
        return max(1, min(channels, TILE_BYTES // (4 * slice_voxels * dz))), dz
    return 1, max(1, TILE_BYTES // (4 * slice_voxels))


def axis_matrices(
    plane: str, grids: torch.Tensor, out_dim: int, region: Sequence[tuple[int, int]], grid_size: int,
    origin: tuple[int, int], scale: float,
) -> dict[int, torch.Tensor]:
    """Spatial axis -> (outputs of the region, tokens held) interpolation matrix for the
    plane's two image axes (the columns of the tokens the grids hold, from `origin` on); the
    matrix of the plane's last product (x, or y for yz) carries `scale`: the mean over planes."""
    _, image_axes = PLANE_AXES[plane]
    matrices = {}
    for k, axis in enumerate(image_axes):
        full = interpolation_matrix(grid_size, out_dim, *region[axis], grids.device)
        matrices[axis] = full[:, origin[k] : origin[k] + grids.shape[2 + k]].contiguous()
    matrices[image_axes[1]] *= scale
    return matrices


class TileProduct:
    """A tile as one batched product over its (channel, slice) pairs b, the planes' last products
    side by side along K, so that the tile is written once and never read back:
        tile[b] (Y, X) = [R_b | W_y] @ [W_x^T ; U_b]
    R_b (Y, gx): the pair's xz and xy rows before their product over x (added when both planes
    share W_x, else side by side with their own W_x); U_b (gy, X): its yz columns before the
    product over y. The left operand is kept transposed, (K, Y) per pair, so that every block of
    K rows is one run per pair: the products over z (xz, yz) write their results straight into
    the operands, the xy rows (one product for the tile) are added there. W_x^T and W_y are the
    same in every batch: copied in once per call."""

    def __init__(
        self, matrices: Mapping[str, Mapping[int, torch.Tensor]], shared_x: bool, batch: int, height: int, width: int,
        take: Callable[[int], torch.Tensor],
    ):
        """take(n): n float32 elements of memory for the operands."""
        self.matrices = matrices
        x_planes = [plane for plane in ("xz", "xy") if plane in matrices]  # xz writes its block, xy adds
        groups = [x_planes] if shared_x else [[plane] for plane in x_planes]
        self.x_terms, k = [], 0  # (planes, first, last + 1 row of K)
        for planes in groups:
            gx = matrices[planes[0]][2].shape[1]
            self.x_terms.append((planes, k, k + gx))
            k += gx
        self.y_term = None
        if "yz" in matrices:
            self.y_term = (k, k + matrices["yz"][1].shape[1])
            k = self.y_term[1]
        self.a_t = take(batch * k * height).view(batch, k, height)  # the left operand, transposed
        self.b = take(batch * k * width).view(batch, k, width)
        for planes, k0, k1 in self.x_terms:
            self.b[:, k0:k1] = matrices[planes[0]][2].T
        if self.y_term is not None:
            self.a_t[:, slice(*self.y_term)] = matrices["yz"][1].T
        self.w_y_t = matrices["xy"][1].T.contiguous() if "xy" in matrices else None
        self.rows = take(batch * matrices["xy"][2].shape[1] * height) if "xy" in matrices else None  # the xy product's

    def fill(self, tile: torch.Tensor, blocks: Mapping[str, torch.Tensor], z: slice) -> None:
        """tile (cb, dz, Y, X) = the mean of the planes' features over the tile's slices z
        (relative to the region), from the grids' channels laid out by `block_grids`; the
        tile's old contents are ignored (NaN-safe)."""
        cb, dz, height, width = tile.shape
        a_t, b = self.a_t[: cb * dz], self.b[: cb * dz]
        for planes, k0, k1 in self.x_terms:
            target = a_t[:, k0:k1]  # (cb * dz, gx, Y)
            for plane in planes:
                if plane == "xz":  # grids (cb, gz, gx * Y), normal y
                    self._over_z(plane, blocks[plane], z, target, cb, dz)
                else:  # xy: grids (cb, n, gx, gy), normal z
                    grids = blocks[plane][:, z].reshape(-1, self.w_y_t.shape[0])
                    rows = torch.mm(grids, self.w_y_t, out=self.rows[: grids.shape[0] * height].view(-1, height))
                    if plane is planes[0]:
                        target.copy_(rows.view(target.shape))
                    else:
                        target.add_(rows.view(target.shape))
        if self.y_term is not None:  # grids (cb, gz, gy * X), normal x
            self._over_z("yz", blocks["yz"], z, b[:, slice(*self.y_term)], cb, dz)
        torch.bmm(a_t.transpose(1, 2), b, out=tile.view(cb * dz, height, width))

    def _over_z(self, plane: str, grids: torch.Tensor, z: slice, target: torch.Tensor, cb: int, dz: int) -> None:
        """target (cb * dz, k, n) = the plane's W_z[z] @ grids (cb, gz, k * n) per channel: one
        product for the tile, written in place."""
        w_z = self.matrices[plane][0][z]
        torch.bmm(w_z.expand(cb, *w_z.shape), grids, out=target.view(cb, dz, -1))


def block_grids(plane: str, grids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """A channel block's token grids as float32 in `memory` (1-d, at least grids.numel()), laid
    out for `TileProduct.fill` (small: the tokens), converted and moved in one copy."""
    cb, n, ga, gb = grids.shape
    if plane == "xy":  # (cb, Z, gy, gx) -> (cb, Z, gx, gy)
        return memory[: grids.numel()].view(cb, n, gb, ga).copy_(grids.transpose(2, 3))
    # xz: (cb, Y, gz, gx) -> (cb, gz, gx, Y); yz: (cb, X, gz, gy) -> (cb, gz, gy, X)
    laid_out = memory[: grids.numel()].view(cb, ga, gb, n)
    return laid_out.copy_(grids.permute(0, 2, 3, 1)).view(cb, ga, gb * n)


def fast_features_from_tokens(
    tokens: Mapping[str, torch.Tensor],
    out_dim: int,
    region: Sequence[tuple[int, int]] | None = None,
    grid_size: int | None = None,
    origins: Mapping[str, tuple[int, int]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`features_from_tokens` (same arguments, same values to float32 rounding) in cache-sized
    tiles, for CPU tensors; `out` may have any floating dtype (the tile is cast as it is copied).
    Memory beyond `out`, per thread: a tile (when `out` is not contiguous float32), the product's
    two operands (K / X and K / Y of a tile, K the tokens its last products read), the xy rows
    and a channel block's float32 tokens, all lent from MEMORY (kept for the next build)."""
    if not tokens:
        raise ValueError("features_from_tokens needs the token grids of at least one plane")
    region = [tuple(r) for r in region] if region is not None else [(0, out_dim)] * 3
    channels = next(iter(tokens.values())).shape[0]
    dz, height, width = (hi - lo for lo, hi in region)
    if out is None:
        out = torch.empty((channels, dz, height, width), dtype=torch.float32)
    matrices = {
        plane: axis_matrices(plane, grids, out_dim, region, grid_size or grids.shape[-1],
                             (origins or {}).get(plane, (0, 0)), 1 / len(tokens))
        for plane, grids in tokens.items()
    }
    shared_x = "xy" in matrices and "xz" in matrices and torch.equal(matrices["xy"][2], matrices["xz"][2])
    cb, slab = tile_shape(channels, dz, height * width)
    blocks = -(-channels // cb)
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        workers = min(threads, blocks)
        if workers <= 1:
            build_blocks(tokens, matrices, shared_x, out, (0, channels), cb, slab)
            return out
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                ranges = [(blocks * w // workers * cb, min(channels, blocks * (w + 1) // workers * cb)) for w in range(workers)]
                shares = [pool.submit(build_blocks, tokens, matrices, shared_x, out, r, cb, slab) for r in ranges]
                for share in shares:
                    share.result()
        finally:
            torch.set_num_threads(threads)
    return out


def build_blocks(
    tokens: Mapping[str, torch.Tensor], matrices: Mapping[str, Mapping[int, torch.Tensor]], shared_x: bool,
    out: torch.Tensor, channel_range: tuple[int, int], cb: int, slab: int,
) -> None:
    """Fill out[lo:hi] (channel_range) a tile (cb channels, slab slices) at a time: straight
    into `out` when it is contiguous float32 (each tile is a contiguous piece of it), else in a
    scratch tile copied (and cast) into `out`."""
    lo, hi = channel_range
    _, dz, height, width = out.shape
    with MEMORY.lend() as take:
        scratch = None if out.dtype == torch.float32 and out.is_contiguous() else take(cb * slab * height * width)
        product = TileProduct(matrices, shared_x, cb * slab, height, width, take)
        memory = {plane: take(grids[:cb].numel()) for plane, grids in tokens.items()}  # one block's laid-out tokens
        for c0 in range(lo, hi, cb):
            c1 = min(c0 + cb, hi)
            blocks = {plane: block_grids(plane, grids[c0:c1], memory[plane]) for plane, grids in tokens.items()}
            fill_channels(product, blocks, out, (c0, c1), slab, scratch)


def fill_channels(
    product: TileProduct, blocks: Mapping[str, torch.Tensor], out: torch.Tensor, channels: tuple[int, int], slab: int,
    scratch: torch.Tensor | None,
) -> None:
    """out[c0:c1] (channels), a slab of slices at a time: straight into `out`, or through
    `scratch` (copied and cast) when given."""
    (c0, c1), (_, dz, height, width) = channels, out.shape
    for z0 in range(0, dz, slab):
        z = slice(z0, min(z0 + slab, dz))
        if scratch is None:
            product.fill(out[c0:c1, z], blocks, z)
        else:
            tile = scratch[: (c1 - c0) * (z.stop - z0) * height * width].view(c1 - c0, z.stop - z0, height, width)
            product.fill(tile, blocks, z)
            out[c0:c1, z].copy_(tile)
