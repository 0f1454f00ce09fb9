"""Exact tiled execution of the Encoder/Decoder in bounded memory.

Tiling a VAE naively (diffusers' ``enable_tiling``) runs each tile as if it were the whole image and blends the
overlaps: every GroupNorm then normalizes with its tile's statistics and the attention sees only its tile, which
shows as seams and tone shifts. Here the result equals the untiled one up to float rounding:

* each tile carries a halo wide enough that no 3x3 convolution's zero padding reaches its centre;
* every GroupNorm uses statistics over the whole image: per-(sample, group) sums and sums of squares are
  accumulated over the tiles' own (non-halo) regions in float64 and combined, not averaged per tile;
* attention (the mid block's, and that of attention levels after each of their resnets) always runs over all
  positions at once.

The network is a list of units (:class:`ldm_vae.modules.Unit`). Full-size activations ("stores") are kept only
where they fit the memory budget; between stores, a GroupNorm's statistics are found by a pass over all tiles
that stops at that norm, so high-resolution stretches are recomputed from the last store instead of stored.
Where to store is planned for the whole run (:meth:`_TiledRun.plan`). A store is kept as row bands
(:class:`_Bands`), and the pass that makes the next store frees the bands of the previous one that no later
tile reads, so replacing a store costs the larger of the two plus a few bands, not both.

Each tile's units are called with a normalization provider (:class:`_TileNorms`: the run and that tile's
geometry) that their GroupNorms call instead of normalizing over the tile. All state lives in the run and its
providers; nothing is set on the shared modules, so concurrent or nested runs on one model do not interfere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .modules import GroupNorm, Unit
from .runtime import available_memory

GIB = 1024**3
DEFAULT_STORE_BUDGET = 1 * GIB  # full-size activations kept at once when no max_memory is given


def _find_malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()
_PAGE = 4096 if not hasattr(os, "sysconf") else os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int | None:
    """This process's resident set size, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


HEAP_SLACK = 256 * 1024**2  # resident growth past the run's low point after which freed heap pages go back


class _HeapTrimmer:
    """Hands freed heap pages back to the OS once the process has grown by ``HEAP_SLACK``.

    A tile's activations (tens of MB) fall under glibc's dynamic mmap threshold (up to 32 MB), so they come
    from the heap, and the freed holes stay resident: over the hundreds of tiles of a 2048 px decode the
    process kept 0.7 GB more than it used, on top of the working set that ``max_memory`` budgets.
    ``malloc_trim(0)`` releases free pages anywhere in the heap (glibc >= 2.8). It is called only when the
    resident size has grown by ``HEAP_SLACK`` since its low point, not after every tile: the next tile faults
    released pages in again, which made small-tile runs a quarter slower.
    """

    def __init__(self) -> None:
        self.floor = _resident_bytes()

    def __call__(self) -> None:
        if _MALLOC_TRIM is None:
            return
        rss = _resident_bytes()
        if rss is None or self.floor is None:  # no /proc: trim every time
            _MALLOC_TRIM(0)
            return
        self.floor = min(self.floor, rss)  # a freed store lowers the floor
        if rss - self.floor > HEAP_SLACK:
            _MALLOC_TRIM(0)
            self.floor = _resident_bytes()


class _StopPass(Exception):
    """Raised by a tile's provider once it has summed the input of the norm being collected.

    The rest of the tile's units are not needed, and the units are opaque callables, so unwinding out of them
    is the way to stop. The exception names its run: only that run's ``_tiles`` catches it, so it can never
    end a pass of another (nested) run.
    """

    def __init__(self, run: _TiledRun) -> None:
        super().__init__()
        self.run = run


@dataclass(frozen=True)
class _Span:
    """A 1-D tile: the output positions it owns and the input crop that computes them."""

    out0: int  # owned output range [out0, out1) at the pass's output resolution
    out1: int
    in0: int  # input crop [in0, in1) at the store's resolution
    in1: int
    last: bool  # reaches the end of the image (owns the remainder of every resolution's rows/columns)
    index: int  # position among the pass's spans along its axis


class _Bands:
    """A full-size activation (B, C, H, W) kept as row bands, so a pass can free what it has read.

    Only the run holds its bands; the caller's input is one band, never written to.
    """

    def __init__(self, bands: list[Tensor]) -> None:
        self.bands: list[Tensor | None] = list(bands)
        self.starts = [0]
        for b in bands:
            self.starts.append(self.starts[-1] + b.shape[-2])
        first = bands[0]
        self.shape = (*first.shape[:-2], self.starts[-1], first.shape[-1])
        self.device, self.dtype = first.device, first.dtype

    @classmethod
    def whole(cls, x: Tensor) -> _Bands:
        return cls([x])

    def crop(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Rows [r0, r1) and columns [c0, c1): a view inside one band, else the bands' parts joined."""
        parts = []
        for i, band in enumerate(self.bands):
            b0, b1 = self.starts[i], self.starts[i + 1]
            if b1 <= r0 or b0 >= r1:
                continue
            if band is None:
                raise RuntimeError("exact tiling read a released band")  # a planning bug, never user input
            parts.append(band[..., max(r0, b0) - b0 : min(r1, b1) - b0, c0:c1])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def release_above(self, row: int) -> None:
        """Frees every band that ends at or above ``row``."""
        for i in range(len(self.bands)):
            if self.starts[i + 1] <= row:
                self.bands[i] = None

    def dense(self) -> Tensor:
        """The whole activation as one tensor (the bands joined; the band itself when there is one)."""
        if len(self.bands) == 1:
            return self.bands[0]
        out = torch.cat(self.bands, dim=-2)
        self.bands, self.starts = [out], [0, self.shape[-2]]
        return out


MaxMemory = int | Literal["auto"] | None


def tiled_forward(
    net: nn.Module,
    x: Tensor,
    tile_size: int | None,
    pixels_per_input: int,
    max_memory: MaxMemory = None,
) -> Tensor:
    """Runs ``net`` on ``x`` in one pass, or exactly tiled.

    Args:
        net: an Encoder or Decoder (anything with ``units()``).
        x: input (B, C, H, W): an image for the encoder, a latent for the decoder.
        tile_size: tile edge in image pixels; None runs untiled unless ``max_memory`` is set.
        pixels_per_input: image pixels per input pixel (1 for the encoder, f for the decoder).
        max_memory: bytes the tiled run may use for activations (stores plus tile work); picks
            ``tile_size`` when that is None. Default: 1 GiB of stores. ``"auto"``: a share of the memory the
            device has free (:func:`ldm_vae.runtime.available_memory`); untiled when the estimated working
            set fits it, tiled otherwise, and an allocator failure is retried once, tiled in half the budget.
    """
    if max_memory == "auto":
        return _auto_forward(net, x, tile_size, pixels_per_input)
    if tile_size is None and max_memory is None:
        return net(x)
    return _tiled_forward(net, x, tile_size, pixels_per_input, max_memory)


def _tiled_forward(
    net: nn.Module, x: Tensor, tile_size: int | None, pixels_per_input: int, max_memory: int | None
) -> Tensor:
    units = net.units()
    if tile_size is None:
        tile_size = tile_size_for(units, x, pixels_per_input, max_memory)
    if tile_size < 8:
        raise ValueError(f"tile_size must be at least 8 image pixels, got {tile_size}")
    if max(x.shape[-2:]) * pixels_per_input <= tile_size:
        return net(x)  # one tile is the whole image
    store_budget = DEFAULT_STORE_BUDGET if max_memory is None else int(max_memory * STORE_SHARE)
    with torch.no_grad():
        return _TiledRun(units, tile_size, pixels_per_input, store_budget)(x)


# Share of the free memory an "auto" run budgets for activations. The rest covers the working-set model's
# error (it undercounts reduced precision), the output and its float32 copy, and what the caller does next.
AUTO_SHARE = 0.5


# How allocation failures surface on CPU: PyTorch's allocator, and oneDNN, which reports a failed scratchpad or
# workspace allocation (seen under `ulimit -v`) only as a primitive it could not create.
_CPU_OOM_MESSAGES = ("can't allocate memory", "could not create a primitive")


def _is_out_of_memory(err: BaseException) -> bool:
    """An allocator failure: CUDA's OutOfMemoryError, or the CPU allocator's or oneDNN's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _CPU_OOM_MESSAGES)


def _auto_forward(net: nn.Module, x: Tensor, tile_size: int | None, pixels_per_input: int) -> Tensor:
    """``max_memory="auto"``: untiled if it fits, else tiled in the free memory; one retry in half of it."""
    need = working_set(net.units(), x, pixels_per_input)
    free = available_memory(x.device)
    budget = need if free is None else int(free * AUTO_SHARE)
    attempts = [budget, min(budget, need) // 2]
    error = ""
    for i, mem in enumerate(attempts):
        if i:
            warnings.warn(
                f"out of memory ({error}); retrying {type(net).__name__} tiled within {mem / 1e9:.2f} GB",
                stacklevel=4,
            )
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            if i == 0 and tile_size is None and need <= mem:
                return net(x)
            return _tiled_forward(net, x, tile_size, pixels_per_input, mem)
        except Exception as err:  # the API boundary of a tiled run, not a module's forward
            if not _is_out_of_memory(err):
                raise
            error = str(err).strip().splitlines()[0][:160]
        # Retried after the except block, so the failed attempt's tensors (held by the traceback) are freed.
    h, w = (n * pixels_per_input for n in x.shape[-2:])
    free_text = "unknown" if free is None else f"{free / 1e9:.1f} GB"
    raise MemoryError(
        f"{type(net).__name__} on {x.shape[0]}x{h}x{w} px needs about {need / 1e9:.1f} GB of activations "
        f"untiled and failed tiled within {attempts[-1] / 1e9:.2f} GB ({free_text} free): {error}"
    )


def working_set(units: list[Unit], x: Tensor, pixels_per_input: int) -> int:
    """Estimated peak activation bytes of an untiled run of ``units`` on ``x`` (the tile model, one tile)."""
    bytes_per_px, _ = _working_set_per_pixel(units, x, pixels_per_input)
    return int(bytes_per_px * x.shape[0] * x.shape[-2] * x.shape[-1] * pixels_per_input**2)


STORE_SHARE = 0.6  # of max_memory for full-size activations; the rest is for the tile being computed


def tile_size_for(units: list[Unit], x: Tensor, pixels_per_input: int, max_memory: int) -> int:
    """The largest tile edge (image pixels, multiple of 64) whose working set fits the non-store share."""
    bytes_per_px, halo = _working_set_per_pixel(units, x, pixels_per_input)
    budget = max_memory * (1 - STORE_SHARE)
    edge = int(math.sqrt(budget / max(bytes_per_px * x.shape[0], 1e-9)) - 2 * halo)
    return max(64, edge // 64 * 64)


def _working_set_per_pixel(units: list[Unit], x: Tensor, pixels_per_input: int) -> tuple[float, float]:
    """(Peak bytes per image pixel, halo in image pixels) of running ``units``.

    A tile's peak is about four live activations of the widest layer per image pixel, over the tile and a
    halo of every convolution from the input.
    """
    factor, bytes_per_px, halo = float(pixels_per_input), 0.0, 0.0
    for u in units:
        out_factor = factor / u.scale
        convs = [m for m in getattr(u.fn, "modules", list)() if isinstance(m, nn.Conv2d)]
        if convs:
            widest = max(max(c.in_channels, c.out_channels) for c in convs)
            bytes_per_px = max(bytes_per_px, 4 * widest * x.element_size() / min(factor, out_factor) ** 2)
        halo += u.convs * max(factor, out_factor)
        factor = out_factor
    return bytes_per_px, halo


def _out_size(n: int, units: list[Unit]) -> int:
    """Spatial size after ``units`` for input size ``n`` (LDM's stride-2 conv with (0, 1) padding floors)."""
    for u in units:
        n = n // 2 if u.scale == 0.5 else int(n * u.scale)
    return n


class _TiledRun:
    """One exact tiled run of ``units``: the collected statistics, the pass in progress, the heap trimmer.

    Created per call of :func:`tiled_forward` and never shared, so it is the only mutable state of a run.
    """

    def __init__(self, units: list[Unit], tile_size: int, pixels_per_input: int, store_budget: int) -> None:
        self.units, self.tile_size, self.store_budget = units, tile_size, store_budget
        # Image pixels per feature pixel at each unit's input (and, at the end, the output).
        self.factors = [float(pixels_per_input)]
        for u in units:
            self.factors.append(self.factors[-1] / u.scale)
        self.stats: dict[GroupNorm, tuple[Tensor, Tensor]] = {}  # norm -> (mean, rstd), each (B, G)
        # Norms of tiled units run at their unit's input resolution; attention's norm sees the full input.
        self.norm_factor = {
            n: self.factors[i] for i, u in enumerate(units) if not u.is_global for n in u.norms
        }
        self.collecting: GroupNorm | None = None  # the norm whose statistics the current pass sums
        self.sums: dict[GroupNorm, list[Tensor]] = {}  # norm -> [count, sum, sum of squares], each (B, G)
        self.trim_heap = _HeapTrimmer()

    # ----------------------------------------------------------------------------------------- driver

    def __call__(self, x: Tensor) -> Tensor:
        stores = self.plan(x)
        store, start = _Bands.whole(x), 0  # store = activation at the input of units[start]
        for i, unit in enumerate(self.units):
            if unit.is_global:
                store = self._materialize(store, start, i) if start < i else store
                # All positions at once: the norm's own statistics are global.
                store, start = _Bands.whole(unit(store.dense())), i + 1
                continue
            for norm in unit.norms:
                self._collect(store, start, i + 1, norm)
            if i + 1 in stores:
                store, start = self._materialize(store, start, i + 1), i + 1
        return store.dense()

    # ----------------------------------------------------------------------------------------- schedule

    def plan(self, x: Tensor) -> set[int]:
        """Where to keep full-size activations: the unit indices whose input is a store (the output's too).

        A dynamic program over store positions, like an optimal checkpointing schedule: between two stores
        s < t every norm of units[s:t] costs a pass from s up to it (the units' convolution work, with the
        tiles' halos), and t a pass from s to t. The store at t may follow the one at s when the larger of
        the two plus two bands of each fits the budget (the pass frees the bands of s behind it). Attention's
        input and output are stores whatever the budget, and so is the output.
        """
        shapes = [tuple(x.shape)]
        for u in self.units:
            shapes.append(_shape_after(shapes[-1], u))
        size = [math.prod(sh) * x.element_size() for sh in shapes]
        cost = [_unit_cost(sh, u) for sh, u in zip(shapes[:-1], self.units, strict=True)]
        n = len(self.units)
        forced = {n} | {j for i, u in enumerate(self.units) if u.is_global for j in (i, i + 1)}
        best: list[tuple[float, int]] = [(0.0, -1)] + [(math.inf, -1)] * n
        for t in range(1, n + 1):
            for s in range(t - 1, -1, -1):
                if self.units[s].is_global:  # a global unit is a segment of its own
                    if s == t - 1:
                        best[t] = min(best[t], (best[s][0], s))
                    break
                if best[s][0] == math.inf or not (t in forced or self._fits(s, t, shapes, size)):
                    continue
                total, prefix = best[s][0], 0.0
                for u in range(s, t):
                    # A pass up to unit u computes each tile with its halo: the longer the chain, the wider.
                    tile_out, halo = self._geometry(s, u + 1)[3:]
                    c = cost[u] * ((tile_out + 2 * halo) / tile_out) ** 2
                    k = len(self.units[u].norms)
                    total += sum(prefix + c * j / k for j in range(k))  # each norm's collect pass
                    prefix += c
                best[t] = min(best[t], (total + prefix, s))
        stores, t = set(), n
        while t > 0:
            stores.add(t)
            t = best[t][1]
        return stores

    def _fits(self, s: int, t: int, shapes: list[tuple], size: list[int]) -> bool:
        """Whether the pass from the store at s to one at t stays within the store budget."""
        tile_out = self._geometry(s, t)[3]
        bands = max(1, math.ceil(shapes[t][-2] / tile_out))  # the pass's row bands
        # Early in the pass all of s is held and little of t, late all of t and the last bands of s; a band of
        # either side and one of halo are in flight.
        start, end = size[s] + 2 * size[t] / bands, size[t] + 2 * size[s] / bands
        return max(start, end) <= self.store_budget

    # ----------------------------------------------------------------------------------------- passes

    def _collect(self, store: Tensor, start: int, stop: int, norm: GroupNorm) -> None:
        """One pass over all tiles, up to ``norm``, summing its input over each tile's own region."""
        b = store.shape[0]
        self.collecting = norm
        self.sums[norm] = [
            torch.zeros(b, norm.num_groups, dtype=torch.float64, device=store.device) for _ in range(3)
        ]
        for _ in self._tiles(store, start, stop):
            pass
        self.collecting = None
        n, s, sq = self.sums.pop(norm)
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0)
        self.stats[norm] = (mean.float(), torch.rsqrt(var + norm.eps).float())

    def _materialize(self, store: _Bands, start: int, stop: int) -> _Bands:
        """Runs units[start:stop] over all tiles into a new banded store, freeing ``store``'s bands behind."""
        out: list[Tensor] = []
        for (ys, xs), y in self._tiles(store, start, stop, release=True):
            if len(out) <= ys.index:  # the first tile of a row band
                w = _out_size(store.shape[-1], self.units[start:stop])
                rows = ys.out1 - ys.out0
                out.append(
                    torch.empty(
                        *y.shape[:2], rows, w, dtype=y.dtype, device=y.device, memory_format=_layout(y)
                    )
                )
            out[-1][..., xs.out0 : xs.out1] = y
        return _Bands(out)

    def _geometry(self, start: int, stop: int) -> tuple[float, float, float, int, int]:
        """(f_in, f_out, ratio, tile_out, halo) of a pass over units[start:stop]."""
        units = self.units[start:stop]
        f_in, f_out = self.factors[start], self.factors[stop]
        # Error from a tile edge spreads one pixel per 3x3 conv; count it in image pixels at the coarser side.
        halo_px = sum(
            u.convs * max(self.factors[start + k], self.factors[start + k + 1]) for k, u in enumerate(units)
        )
        ratio = f_out / f_in  # > 1 when the units downsample (encoder)
        align = max(1, round(ratio))  # crops start on the downsampling grid
        halo = math.ceil(halo_px / f_in / align) * align
        # Output tiles are whole multiples of the coarsest resolution in the chain, so every intermediate
        # resolution's region boundaries are integers.
        coarsest = max(self.factors[start : stop + 1])
        step = max(1, round(coarsest / f_out))
        tile_out = max(step, (max(1, round(self.tile_size / f_out)) // step) * step)
        return f_in, f_out, ratio, tile_out, halo

    def _tiles(self, store: _Bands, start: int, stop: int, release: bool = False):
        """Yields ((row span, column span), tile output cropped to its own region) for units[start:stop];
        with ``release``, frees each band of ``store`` once no later tile reads it."""
        units = self.units[start:stop]
        f_in, f_out, ratio, tile_out, halo = self._geometry(start, stop)
        rows = self._spans(store.shape[-2], units, tile_out, ratio, halo)
        cols = self._spans(store.shape[-1], units, tile_out, ratio, halo)
        for ys in rows:
            if release:  # rows above this band's crop are read by no later band
                store.release_above(ys.in0)
            for xs in cols:
                norms = _TileNorms(self, ys, xs, f_in, f_out)
                crop = store.crop(ys.in0, ys.in1, xs.in0, xs.in1)
                try:
                    y = crop
                    for u in units:
                        y = u(y, norms)
                except _StopPass as stop:
                    if stop.run is not self:
                        raise
                    continue
                finally:
                    self.trim_heap()
                # Local output index of global out0: crops start on the grid, so this is exact.
                oy, ox = round(ys.in0 / ratio), round(xs.in0 / ratio)
                yield (ys, xs), y[..., ys.out0 - oy : ys.out1 - oy, xs.out0 - ox : xs.out1 - ox]

    @staticmethod
    def _spans(n_in: int, units: list[Unit], tile_out: int, ratio: float, halo: int) -> list[_Span]:
        n_out = _out_size(n_in, units)
        spans = []
        for o0 in range(0, n_out, tile_out):
            o1 = min(o0 + tile_out, n_out)
            i0 = max(0, round(o0 * ratio) - halo)
            i1 = n_in if o1 == n_out else min(n_in, round(o1 * ratio) + halo)
            spans.append(_Span(o0, o1, i0, i1, last=o1 == n_out, index=len(spans)))
        return spans


class _TileNorms:
    """Normalization provider for one tile of one run (a :data:`ldm_vae.modules.NormProvider`).

    A norm whose statistics the run has applies them; the norm being collected adds its input over the tile's
    own region to the run's sums and stops the tile's pass (:class:`_StopPass`).
    """

    __slots__ = ("cols", "f_in", "f_out", "rows", "run")

    def __init__(self, run: _TiledRun, rows: _Span, cols: _Span, f_in: float, f_out: float) -> None:
        self.run, self.rows, self.cols = run, rows, cols
        self.f_in, self.f_out = f_in, f_out  # image pixels per pixel of the pass's input and output

    def __call__(self, norm: GroupNorm, x: Tensor) -> Tensor:
        run = self.run
        if norm in run.stats:
            mean, rstd = run.stats[norm]
            return _group_norm_with_stats(x, norm, mean, rstd)
        if norm is not run.collecting:
            raise RuntimeError("exact tiling reached a GroupNorm before its statistics were collected")
        ry, rx = self._own_region(norm, x)
        own = x[..., ry, rx].to(torch.float64)
        b = own.shape[0]
        own = own.reshape(b, norm.num_groups, -1)
        n, s, sq = run.sums[norm]
        n += own.shape[-1]
        s += own.sum(-1)
        sq += own.square().sum(-1)
        raise _StopPass(run)

    def _own_region(self, norm: GroupNorm, x: Tensor) -> tuple[slice, slice]:
        """The part of ``x`` (this tile's input to ``norm``) that the tile owns, in x's local coordinates."""
        f_norm = self.run.norm_factor[norm]
        slices = []
        for span, n_local in ((self.rows, x.shape[-2]), (self.cols, x.shape[-1])):
            # Global index of x's first row (column) at the norm's resolution.
            g0 = round(span.in0 * self.f_in / f_norm)
            own0 = round(span.out0 * self.f_out / f_norm)
            own1 = g0 + n_local if span.last else round(span.out1 * self.f_out / f_norm)
            slices.append(slice(own0 - g0, own1 - g0))
        return slices[0], slices[1]


def _group_norm_with_stats(x: Tensor, norm: GroupNorm, mean: Tensor, rstd: Tensor) -> Tensor:
    """GroupNorm of ``x`` with given per-(sample, group) mean and 1/std, then the affine transform."""
    b, c = x.shape[:2]
    g = norm.num_groups
    scale = (rstd[:, :, None] * norm.weight.float().view(1, g, c // g)).reshape(b, c, 1, 1)
    shift = norm.bias.float().view(1, c, 1, 1) - (
        mean[:, :, None].expand(b, g, c // g).reshape(b, c, 1, 1) * scale
    )
    # One fused pass, no float32 copy of a reduced-precision tile: those copies were the largest temporaries
    # of a tiled run. addcmul computes in float32 internally for bf16/fp16 and rounds once.
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def _layout(x: Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _shape_after(shape: tuple[int, ...], unit: Unit) -> tuple[int, ...]:
    """Shape of ``unit``'s output for an input of ``shape``."""
    channels = unit.out_channels
    if channels is None:
        convs = [m for m in getattr(unit.fn, "modules", list)() if isinstance(m, nn.Conv2d)]
        channels = convs[-1].out_channels if convs else shape[1]
    return (shape[0], channels, *(_out_size(n, [unit]) for n in shape[2:]))


def _unit_cost(shape: tuple[int, ...], unit: Unit) -> float:
    """Relative cost of ``unit`` on an input of ``shape``: its 3x3 convolutions' multiply-adds."""
    out = _shape_after(shape, unit)
    return max(1, unit.convs) * max(shape[1], out[1]) ** 2 * math.prod(out[2:]) * out[0]
