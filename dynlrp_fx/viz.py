"""Visualisation of relevance maps: image heatmaps, overlays, grids and token heatmaps.

This module turns the relevance tensors produced by the LRP compiler into
pictures, in the spirit of ``zennit.image``, Captum's ``visualization`` module
and LXT's token heatmaps:

* :func:`heatmap` -- relevance ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)`` to an
  RGB ``uint8`` image with a signed, zero-centred diverging colour map;
* :func:`overlay` -- a heatmap alpha-blended over the input image;
* :func:`image_grid` -- many heatmaps (or overlays) tiled into one image;
* :func:`save_image` -- write an image or a relevance map to a PNG file;
* :func:`token_html` -- a self-contained HTML page colouring tokens by relevance;
* :func:`token_terminal` -- the same with ANSI 24-bit colours for a terminal;
* :func:`strip_ansi` -- remove ANSI escape sequences from a string.

Dependencies
------------
Only :mod:`numpy` is required.  ``torch`` tensors are accepted but ``torch`` is
never imported here.  :mod:`matplotlib` is an optional extra
(``pip install "dynlrp-fx[viz]"``) and is imported lazily, only by the features
that need it: colour maps other than the built-in ``"bwr"`` and the titles of
:func:`image_grid`.  :func:`save_image` uses PIL or matplotlib when available and
falls back to a small built-in PNG encoder otherwise.

Colour convention
-----------------
Positive relevance is red, negative relevance is blue and zero is white (the
centre of the ``bwr`` colour map).  With ``symmetric=True`` (the default) the map
is scaled by its largest absolute value, so that a map and its negation give
colour-mirrored images (red and blue channels swapped).
"""

from __future__ import annotations

import html
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "heatmap",
    "image_grid",
    "overlay",
    "save_image",
    "strip_ansi",
    "token_html",
    "matrix_html",
    "token_terminal",
]

#: Anything :func:`numpy.asarray` understands, or a ``torch.Tensor``.
ArrayLike = Any

_INSTALL_HINT = 'pip install "dynlrp-fx[viz]"'
_CHANNEL_REDUCTIONS = ("sum", "abs_sum", "max_abs")
_TOKEN_NORMALIZATIONS = ("symmetric", "global", "none")
_SPACE_MARKERS = ("\u2581", "\u0120")  # sentencepiece "▁", GPT-2 byte-level BPE "Ġ"
_WORDPIECE_MARKER = "##"
_ANSI_RE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])"
)
_ANSI_RESET = "\x1b[0m"


# ---------------------------------------------------------------------------
# helpers: optional dependencies and array conversion
# ---------------------------------------------------------------------------


def _require_matplotlib(feature: str) -> Any:
    """Import and return :mod:`matplotlib`, or raise an ImportError with the install hint."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - exercised with a blocked import
        raise ImportError(
            f"{feature} requires matplotlib, which is an optional dependency of "
            f"dynlrp-fx; install it with: {_INSTALL_HINT}"
        ) from exc
    return matplotlib


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Convert a torch tensor (without importing torch) or any array-like to numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        t = x.detach().cpu()
        if t.is_complex():
            raise TypeError("complex tensors cannot be visualised")
        if t.dtype.is_floating_point and str(t.dtype) not in (
            "torch.float32",
            "torch.float64",
        ):
            t = t.float()  # float16 / bfloat16 have no (exact) numpy counterpart
        return t.numpy()
    return np.asarray(x)


def _as_float(x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a float64 numpy array (a copy)."""
    arr = _to_numpy(x)
    if np.iscomplexobj(arr):
        raise TypeError("complex arrays cannot be visualised")
    return np.array(arr, dtype=np.float64)


def _sanitize(arr: np.ndarray, what: str) -> np.ndarray:
    """Replace NaN by 0 and +-inf by +-(largest finite magnitude), with a warning."""
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    warnings.warn(
        f"{what} contains NaN or infinite values; NaN is shown as 0 and +-inf as the "
        "largest finite magnitude",
        RuntimeWarning,
        stacklevel=3,
    )
    big = float(np.abs(arr[finite]).max()) if finite.any() else 1.0
    big = big if big > 0 else 1.0
    return np.nan_to_num(arr, nan=0.0, posinf=big, neginf=-big)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float colours in [0, 1] to uint8 in [0, 255]."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _bwr(signed: np.ndarray) -> np.ndarray:
    """The ``bwr`` colour map evaluated exactly on signed values in [-1, 1].

    ``-1`` is blue ``(0, 0, 1)``, ``0`` is white and ``+1`` is red ``(1, 0, 0)``, with
    linear interpolation in between (matplotlib's ``bwr`` without its 256-entry
    quantisation, so that 0 is exactly white and ``s`` / ``-s`` are exact mirrors).
    """
    a = np.abs(signed)
    fade = 1.0 - a
    red = np.where(signed > 0, 1.0, fade)
    blue = np.where(signed < 0, 1.0, fade)
    return np.stack([red, fade, blue], axis=-1)


def _resolve_cmap(
    cmap: str | Callable[[np.ndarray], Any],
) -> Callable[[np.ndarray], Any] | None:
    """``None`` for the built-in ``"bwr"``, otherwise a callable colour map."""
    if isinstance(cmap, str):
        if cmap == "bwr":
            return None
        mpl = _require_matplotlib(f"heatmap(cmap={cmap!r})")
        try:
            return mpl.colormaps[cmap]
        except (AttributeError, KeyError) as exc:
            raise ValueError(f"unknown matplotlib colour map {cmap!r}") from exc
    if callable(cmap):
        return cmap
    raise TypeError(
        f"cmap must be a colour map name or a callable, got {type(cmap).__name__}"
    )


def _apply_cmap(cmap: Callable[[np.ndarray], Any], values: np.ndarray) -> np.ndarray:
    """Evaluate a matplotlib-like colour map on values in [0, 1]; float RGB in [0, 1]."""
    out = np.asarray(cmap(values))
    if out.shape[:-1] != values.shape or out.shape[-1] not in (3, 4):
        raise ValueError(
            f"the colour map returned shape {out.shape} for input {values.shape}; expected "
            "an extra last axis of size 3 (RGB) or 4 (RGBA)"
        )
    out = out[..., :3]
    if np.issubdtype(out.dtype, np.integer):
        return out.astype(np.float64) / 255.0
    return np.clip(out.astype(np.float64), 0.0, 1.0)


def _reduce_channels(maps: np.ndarray, channel_reduce: str) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W)."""
    if channel_reduce == "sum":
        return maps.sum(axis=1)
    if channel_reduce == "abs_sum":
        return np.abs(maps).sum(axis=1)
    if channel_reduce == "max_abs":
        idx = np.abs(maps).argmax(axis=1)[:, None]
        return np.take_along_axis(maps, idx, axis=1)[:, 0]
    raise ValueError(
        f"channel_reduce must be one of {_CHANNEL_REDUCTIONS}, got {channel_reduce!r}"
    )


def _per_sample_scale(maps: np.ndarray) -> np.ndarray:
    """Divide each sample by its largest magnitude (guards sums against overflow)."""
    axes = tuple(range(1, maps.ndim))
    peak = np.abs(maps).max(axis=axes, keepdims=True)
    return maps / np.where(peak > 0, peak, 1.0)


# ---------------------------------------------------------------------------
# image heatmaps
# ---------------------------------------------------------------------------


def heatmap(
    relevance: ArrayLike,
    *,
    cmap: str | Callable[[np.ndarray], Any] = "bwr",
    symmetric: bool = True,
    level: float = 1.0,
    channel_reduce: str = "sum",
) -> np.ndarray:
    """Render a relevance map as an RGB ``uint8`` image.

    The channels are reduced to one value per pixel, the result is normalised
    per sample, and a colour map is applied.  With ``symmetric=True`` the
    normalisation is centred on zero: values are divided by
    ``vmax = max|R| / level`` and clipped to ``[-1, 1]``, so zero relevance maps
    to the centre of the colour map (white for ``"bwr"``), positive relevance to
    red and negative relevance to blue, and ``heatmap(-R)`` is ``heatmap(R)``
    with its red and blue channels swapped.  An all-zero map gives the centre
    colour everywhere.  NaN is treated as 0 and +-inf as the largest finite
    magnitude (with a :class:`RuntimeWarning`).

    Parameters
    ----------
    relevance : array-like or torch.Tensor
        A map of shape ``(H, W)``, ``(C, H, W)`` or a batch ``(N, C, H, W)``.
    cmap : str or callable, default "bwr"
        ``"bwr"`` is built in (blue-white-red, evaluated exactly, no matplotlib
        needed).  Any other name is looked up in matplotlib's colour maps (needs
        the ``viz`` extra).  A callable receives values in ``[0, 1]`` and must
        return RGB or RGBA colours on an extra last axis (floats in ``[0, 1]`` or
        integers in ``[0, 255]``), like a matplotlib ``Colormap``.
    symmetric : bool, default True
        Centre the normalisation on zero (see above).  With ``False`` the map is
        min-max normalised to ``[0, 1]`` instead (a constant map gives the centre
        colour) -- useful for non-negative maps with a sequential colour map.
    level : float, default 1.0
        Contrast: ``vmax = max|R| / level``.  Values above 1 saturate the
        strongest relevance; values below 1 make the image paler.  For
        ``symmetric=False`` the upper bound is ``min + (max - min) / level``.
    channel_reduce : {"sum", "abs_sum", "max_abs"}, default "sum"
        How ``(C, H, W)`` is reduced to ``(H, W)``: the signed sum over channels
        (LRP conservation), the sum of absolute values (always non-negative),
        or the signed value of the channel with the largest magnitude.

    Returns
    -------
    numpy.ndarray
        ``uint8`` image of shape ``(H, W, 3)``, or ``(N, H, W, 3)`` for a batch.

    Examples
    --------
    >>> import numpy as np
    >>> rel = np.array([[1.0, 0.0, -1.0]])
    >>> heatmap(rel)[0].tolist()
    [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    >>> heatmap(np.zeros((3, 4, 5))).shape
    (4, 5, 3)
    """
    if not (isinstance(level, (int, float)) and math.isfinite(level) and level > 0):
        raise ValueError(f"level must be a positive finite number, got {level!r}")
    colour_map = _resolve_cmap(cmap)
    arr = _sanitize(_as_float(relevance), "relevance")
    if arr.ndim == 2:
        maps = arr[None]
    elif arr.ndim in (3, 4):
        batch = arr[None] if arr.ndim == 3 else arr
        maps = _reduce_channels(_per_sample_scale(batch), channel_reduce)
    else:
        raise ValueError(
            f"relevance must have shape (H, W), (C, H, W) or (N, C, H, W), got {arr.shape}"
        )

    axes = (1, 2)
    if symmetric:
        peak = np.abs(maps).max(axis=axes, keepdims=True)
        safe = np.where(peak > 0, peak, 1.0)
        signed = np.clip(maps / safe * level, -1.0, 1.0)
        if colour_map is None:
            rgb = _bwr(signed)
        else:
            rgb = _apply_cmap(colour_map, (signed + 1.0) / 2.0)
    else:
        scaled = _per_sample_scale(maps)  # keep (max - min) finite
        lo = scaled.min(axis=axes, keepdims=True)
        span = scaled.max(axis=axes, keepdims=True) - lo
        unit = np.where(
            span > 0, (scaled - lo) / np.where(span > 0, span, 1.0) * level, 0.5
        )
        unit = np.clip(unit, 0.0, 1.0)
        rgb = (
            _bwr(2.0 * unit - 1.0)
            if colour_map is None
            else _apply_cmap(colour_map, unit)
        )

    out = _to_uint8(rgb)
    return out if arr.ndim == 4 else out[0]


def _image_to_rgb(image: ArrayLike) -> np.ndarray:
    """An image in one of the accepted layouts -> float RGB in [0, 1], (..., H, W, 3).

    ``uint8`` images are read as channel-last ``(H, W, 3)`` and scaled by 1/255;
    other dtypes as channel-first ``(C, H, W)`` and min-max normalised per image.
    If the preferred layout does not fit, the other one is tried.  ``(H, W)`` is
    grey; a leading batch axis is allowed.
    """
    arr = _to_numpy(image)
    is_uint8 = arr.dtype == np.uint8
    arr = arr.astype(np.float64)
    if not is_uint8:
        arr = _sanitize(arr, "image")

    def _hwc(a: np.ndarray) -> np.ndarray:
        """Single image (2-D or 3-D) -> (H, W, C)."""
        if a.ndim == 2:
            return a[..., None]
        first_ok, last_ok = a.shape[0] in (1, 3, 4), a.shape[-1] in (1, 3, 4)
        if is_uint8:
            channel_last = last_ok or not first_ok
        else:
            channel_last = last_ok and not first_ok
        if not (first_ok or last_ok):
            raise ValueError(
                f"cannot find a colour axis of size 1, 3 or 4 in shape {a.shape}"
            )
        return a if channel_last else np.moveaxis(a, 0, -1)

    if arr.ndim in (2, 3):
        images = [_hwc(arr)]
    elif arr.ndim == 4:
        images = [_hwc(a) for a in arr]
    else:
        raise ValueError(
            f"image must be 2-D, 3-D or a 4-D batch, got shape {arr.shape}"
        )

    out = []
    for img in images:
        if img.shape[-1] == 4:
            img = img[..., :3]  # drop alpha
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        if is_uint8:
            img = img / 255.0
        else:
            img = _per_sample_scale(img[None])[0]
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        out.append(img)
    return np.stack(out) if arr.ndim == 4 else out[0]


def overlay(
    image: ArrayLike,
    relevance: ArrayLike,
    *,
    alpha: float = 0.5,
    **heatmap_kwargs: Any,
) -> np.ndarray:
    """Blend the relevance heatmap over the input image.

    The result is ``(1 - alpha) * image + alpha * heatmap(relevance)``.

    Parameters
    ----------
    image : array-like or torch.Tensor
        ``(C, H, W)`` float image in any value range (min-max normalised to
        ``[0, 1]`` per image; ``C`` is 1, 3 or 4), or ``(H, W, 3)`` ``uint8``
        (scaled by 1/255; a channel-first ``uint8`` tensor such as
        ``torchvision.io.read_image`` output is recognised too), or ``(H, W)``
        grey.  A leading batch axis ``N`` is allowed if ``relevance`` is a batch.
    relevance : array-like or torch.Tensor
        Relevance with the same spatial size, see :func:`heatmap`.
    alpha : float, default 0.5
        Weight of the heatmap, in ``[0, 1]``; 0 gives the image, 1 the heatmap.
    **heatmap_kwargs
        Passed to :func:`heatmap` (``cmap``, ``symmetric``, ``level``,
        ``channel_reduce``).

    Returns
    -------
    numpy.ndarray
        ``uint8`` array ``(H, W, 3)`` (or ``(N, H, W, 3)`` for a batch).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((3, 2, 2))  # constant image -> black
    >>> rel = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    >>> overlay(img, rel, alpha=0.5)[0, 0].tolist()
    [128, 0, 0]
    """
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    heat = heatmap(relevance, **heatmap_kwargs)
    rgb = _image_to_rgb(image)
    if rgb.shape != heat.shape:
        raise ValueError(
            f"image {tuple(rgb.shape)} and heatmap {tuple(heat.shape)} (as (..., H, W, 3)) "
            "have different shapes"
        )
    return _to_uint8((1.0 - alpha) * rgb + alpha * (heat / 255.0))


# ---------------------------------------------------------------------------
# PNG output and grids
# ---------------------------------------------------------------------------


def _png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) or (H, W, 4) uint8 array as PNG with only the stdlib."""
    height, width, channels = rgb.shape
    colour_type = {3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = np.concatenate(
        [
            np.zeros((height, 1), np.uint8),
            np.ascontiguousarray(rgb).reshape(height, -1),
        ],
        axis=1,
    ).tobytes()  # filter type 0 (None) before each scanline
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _write_png(rgb: np.ndarray, path: Path, writer: str) -> None:
    if writer not in ("auto", "pil", "matplotlib", "builtin"):
        raise ValueError(
            f"writer must be 'auto', 'pil', 'matplotlib' or 'builtin', got {writer!r}"
        )
    if writer in ("auto", "pil"):
        try:
            from PIL import Image
        except ImportError:
            if writer == "pil":
                raise
        else:
            Image.fromarray(rgb).save(path, format="PNG")
            return
    if writer in ("auto", "matplotlib"):
        try:
            import matplotlib.image as mpimg
        except ImportError:
            if writer == "matplotlib":
                _require_matplotlib("save_image(writer='matplotlib')")
                raise
        else:
            mpimg.imsave(path, rgb, format="png")
            return
    path.write_bytes(_png_bytes(rgb))


def save_image(
    array_or_tensor: ArrayLike,
    path: str | os.PathLike[str],
    *,
    writer: str = "auto",
    **heatmap_kwargs: Any,
) -> Path:
    """Write an RGB image or a relevance map to a PNG file.

    A ``uint8`` array of shape ``(H, W, 3)`` or ``(H, W, 4)`` (for example the
    output of :func:`heatmap`, :func:`overlay` or :func:`image_grid`) is written
    as it is.  Anything else is taken as a relevance map ``(H, W)`` or
    ``(C, H, W)`` and converted with :func:`heatmap` first.  For batches use
    :func:`image_grid` with ``path=``.

    Parameters
    ----------
    array_or_tensor : array-like or torch.Tensor
        The image or relevance map.
    path : str or os.PathLike
        Output file name (PNG is written whatever the suffix).
    writer : {"auto", "pil", "matplotlib", "builtin"}, default "auto"
        ``"auto"`` uses PIL if importable, else ``matplotlib.image.imsave``, else
        the built-in (zlib) PNG encoder, so that saving never needs an extra.
    **heatmap_kwargs
        Passed to :func:`heatmap` when a relevance map is given.

    Returns
    -------
    pathlib.Path
        The path written.

    Examples
    --------
    >>> import numpy as np
    >>> save_image(np.random.randn(3, 32, 32), "relevance.png")  # doctest: +SKIP
    PosixPath('relevance.png')
    """
    arr = _to_numpy(array_or_tensor)
    if not (arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        if arr.ndim == 4:
            raise ValueError(
                "save_image writes one image; use image_grid(..., path=...) for a batch"
            )
        arr = heatmap(arr, **heatmap_kwargs)
    out = Path(path)
    _write_png(np.ascontiguousarray(arr), out, writer)
    return out


def _split_items(items: ArrayLike | Sequence[ArrayLike], name: str) -> list[Any]:
    """A 4-D batch -> list of its samples; a list/tuple -> list."""
    if isinstance(items, (list, tuple)):
        return list(items)
    arr = _to_numpy(items)
    if arr.ndim == 4:
        return list(arr)
    raise ValueError(
        f"{name} must be a list of maps or a 4-D batch (N, C, H, W), got {arr.shape}"
    )


def _render_title(text: str, width: int, height: int, background: int) -> np.ndarray:
    """Render ``text`` centred in a (height, width, 3) uint8 strip with matplotlib (Agg)."""
    _require_matplotlib("image_grid(titles=...)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100.0
    bg = background / 255.0
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=(bg, bg, bg))
    canvas = FigureCanvasAgg(fig)
    fontsize = 0.6 * height * 72.0 / dpi
    label = fig.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        fontsize=fontsize,
        color="black" if background >= 128 else "white",
    )
    extent = label.get_window_extent(renderer=canvas.get_renderer())
    if extent.width > width - 2:
        label.set_fontsize(max(1.0, fontsize * (width - 2) / extent.width))
    canvas.draw()
    buf = np.asarray(canvas.buffer_rgba())[..., :3]
    strip = np.full((height, width, 3), background, np.uint8)
    h, w = min(height, buf.shape[0]), min(width, buf.shape[1])
    strip[:h, :w] = buf[:h, :w]
    return strip


def image_grid(
    relevances: ArrayLike | Sequence[ArrayLike],
    *,
    images: ArrayLike | Sequence[ArrayLike] | None = None,
    ncols: int = 8,
    padding: int = 2,
    titles: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    alpha: float = 0.5,
    pad_value: int = 255,
    title_height: int = 16,
    **heatmap_kwargs: Any,
) -> np.ndarray:
    """Tile heatmaps (or overlays) into one RGB ``uint8`` image.

    The layout follows ``torchvision.utils.make_grid``: with ``n`` tiles,
    ``c = min(ncols, n)`` columns and ``r = ceil(n / c)`` rows, every tile is
    surrounded by ``padding`` pixels, so the grid is
    ``(r * (h + padding) + padding, c * (w + padding) + padding, 3)`` where
    ``h, w`` are the largest tile height and width (``h`` includes
    ``title_height`` when titles are given).  Smaller tiles are centred.

    Parameters
    ----------
    relevances : list of array-like, or a 4-D batch
        Relevance maps (each as accepted by :func:`heatmap`), or a batch
        ``(N, C, H, W)``.  A ``uint8`` ``(H, W, 3)`` element is taken as an
        already rendered image and placed as it is.
    images : list of array-like, or a 4-D batch, optional
        Input images, one per map; if given, tiles are :func:`overlay` results.
    ncols : int, default 8
        Maximum number of columns.
    padding : int, default 2
        Pixels between tiles and around the border.
    titles : list of str, optional
        One title per tile, drawn above it (needs matplotlib).
    path : str or os.PathLike, optional
        If given, the grid is also written there as PNG (:func:`save_image`).
    alpha : float, default 0.5
        Heatmap weight for overlays.
    pad_value : int, default 255
        Grey value of the padding and title background (255 is white).
    title_height : int, default 16
        Height in pixels of the title strip above each tile.
    **heatmap_kwargs
        Passed to :func:`heatmap`.

    Returns
    -------
    numpy.ndarray
        The grid, ``uint8`` of shape ``(height, width, 3)``.

    Examples
    --------
    >>> import numpy as np
    >>> maps = [np.random.randn(3, 8, 10) for _ in range(5)]
    >>> image_grid(maps, ncols=3, padding=2).shape
    (22, 38, 3)
    """
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in [0, 255], got {pad_value}")
    rels = _split_items(relevances, "relevances")
    if not rels:
        raise ValueError("relevances is empty")
    imgs = None if images is None else _split_items(images, "images")
    if imgs is not None and len(imgs) != len(rels):
        raise ValueError(f"got {len(imgs)} images for {len(rels)} relevance maps")
    if titles is not None:
        titles = list(titles)
        if len(titles) != len(rels):
            raise ValueError(f"got {len(titles)} titles for {len(rels)} relevance maps")

    tiles = []
    for i, rel in enumerate(rels):
        rel_arr = _to_numpy(rel)
        if rel_arr.dtype == np.uint8 and rel_arr.ndim == 3 and rel_arr.shape[-1] == 3:
            tile = rel_arr
        elif imgs is not None:
            tile = overlay(imgs[i], rel_arr, alpha=alpha, **heatmap_kwargs)
        else:
            tile = heatmap(rel_arr, **heatmap_kwargs)
        if tile.ndim != 3:
            raise ValueError(
                f"element {i} is a batch; pass single maps or one 4-D batch"
            )
        tiles.append(tile)

    tile_h = max(t.shape[0] for t in tiles)
    tile_w = max(t.shape[1] for t in tiles)
    top = title_height if titles is not None else 0
    cell_h, cell_w = tile_h + top, tile_w
    cols = min(ncols, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    grid = np.full(
        (rows * (cell_h + padding) + padding, cols * (cell_w + padding) + padding, 3),
        pad_value,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        y0 = padding + (i // cols) * (cell_h + padding)
        x0 = padding + (i % cols) * (cell_w + padding)
        if titles is not None and top > 0:
            grid[y0 : y0 + top, x0 : x0 + cell_w] = _render_title(
                str(titles[i]), cell_w, top, pad_value
            )
        dy = y0 + top + (tile_h - tile.shape[0]) // 2
        dx = x0 + (tile_w - tile.shape[1]) // 2
        grid[dy : dy + tile.shape[0], dx : dx + tile.shape[1]] = tile
    if path is not None:
        save_image(grid, path)
    return grid


# ---------------------------------------------------------------------------
# token heatmaps
# ---------------------------------------------------------------------------


def _as_1d(values: ArrayLike, length: int, row: int) -> np.ndarray:
    arr = _as_float(values)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(
            f"relevance of row {row} must be 1-D (one value per token), got shape {arr.shape}; "
            "reduce the hidden dimension first, e.g. relevance.sum(-1)"
        )
    if arr.shape[0] != length:
        raise ValueError(
            f"row {row} has {length} tokens but {arr.shape[0]} relevance values"
        )
    return arr


def _token_rows(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    relevance: ArrayLike,
    labels: Sequence[str] | None,
) -> tuple[list[list[str]], list[np.ndarray], list[str] | None]:
    """Normalise the single-row / multi-row inputs to lists of rows."""
    if isinstance(tokens, str):
        raise TypeError(
            "tokens must be a sequence of token strings, not a single string"
        )
    tokens = list(tokens)
    multi = bool(tokens) and isinstance(tokens[0], (list, tuple))
    if multi:
        if not all(isinstance(row, (list, tuple)) for row in tokens):
            raise TypeError(
                "tokens mixes strings and lists; pass a list of str or a list of lists"
            )
        rows = [[str(t) for t in row] for row in tokens]
        if isinstance(relevance, (list, tuple)):
            rel_rows = list(relevance)
        else:
            rel_arr = _as_float(relevance)
            if rel_arr.ndim != 2:
                raise ValueError(
                    "with several token rows, relevance must be a list of 1-D arrays or a 2-D "
                    f"array, got shape {rel_arr.shape}"
                )
            rel_rows = list(rel_arr)
        if len(rel_rows) != len(rows):
            raise ValueError(
                f"got {len(rows)} token rows but {len(rel_rows)} relevance rows"
            )
    else:
        rows = [[str(t) for t in tokens]]
        rel_rows = [relevance]
    values = [_as_1d(r, len(row), i) for i, (row, r) in enumerate(zip(rows, rel_rows))]
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(rows):
            raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    return rows, values, labels


def _token_display(tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """(display text, space before) per token, handling subword markers.

    If any token of the row starts with the sentencepiece ``▁`` or GPT-2 ``Ġ``
    marker, marked tokens start a word (shown without the marker, preceded by a
    space) and unmarked tokens continue the previous one.  Otherwise WordPiece
    rules apply: ``##x`` continues the previous token, anything else starts a word.
    A token that would display as nothing is shown as it is.
    """
    marker_mode = any(t.startswith(_SPACE_MARKERS) for t in tokens)
    gpt2 = any(t.startswith("\u0120") for t in tokens)
    out = []
    for i, tok in enumerate(tokens):
        if marker_mode:
            starts_word = tok.startswith(_SPACE_MARKERS)
            text = tok[1:] if starts_word else tok
            if gpt2:
                text = text.replace(
                    "\u010a", "\u21b5"
                )  # GPT-2 newline marker "Ċ" -> "↵"
        else:
            continuation = tok.startswith(_WORDPIECE_MARKER) and len(tok) > len(
                _WORDPIECE_MARKER
            )
            starts_word = not continuation
            text = tok[len(_WORDPIECE_MARKER) :] if continuation else tok
        out.append((text if text else tok, starts_word and i > 0))
    return out


def _token_signed(values: list[np.ndarray], normalize: str | float) -> list[np.ndarray]:
    """Relevance rows -> signed intensities in [-1, 1]."""
    clean = [_sanitize(v, "relevance") for v in values]
    if isinstance(normalize, str):
        if normalize == "symmetric":
            scales = [float(np.abs(v).max()) if v.size else 0.0 for v in clean]
        elif normalize == "global":
            peak = max((float(np.abs(v).max()) for v in clean if v.size), default=0.0)
            scales = [peak] * len(clean)
        elif normalize == "none":
            scales = [1.0] * len(clean)
        else:
            raise ValueError(
                f"normalize must be one of {_TOKEN_NORMALIZATIONS} or a positive number, "
                f"got {normalize!r}"
            )
    elif (
        isinstance(normalize, (int, float))
        and not isinstance(normalize, bool)
        and normalize > 0
    ):
        scales = [float(normalize)] * len(clean)
    else:
        raise ValueError(
            f"normalize must be a string or a positive number, got {normalize!r}"
        )
    return [
        np.clip(v / s, -1.0, 1.0) if s > 0 else np.zeros_like(v)
        for v, s in zip(clean, scales)
    ]


def _token_colours(signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background and (readable) foreground uint8 colours, each (T, 3)."""
    bg = _to_uint8(_bwr(signed)).reshape(-1, 3)
    luminance = bg @ np.array([0.299, 0.587, 0.114])
    fg = np.where((luminance > 140)[:, None], 0, 255).astype(np.uint8)
    return bg, np.broadcast_to(fg, bg.shape)


_HTML_CSS = """\
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.2em; }
.legend { display: flex; align-items: center; gap: 0.5em; font-size: 0.8em; margin: 0.5em 0 1em; }
.legend .bar { width: 12em; height: 0.9em; border: 1px solid #999;
               background: linear-gradient(to right, rgb(0,0,255), rgb(255,255,255), rgb(255,0,0)); }
.row { margin: 0.6em 0; }
.label { font-size: 0.8em; font-weight: bold; color: #555; margin-bottom: 0.2em; }
.seq { line-height: 1.9; white-space: pre-wrap; font-size: 1em; }
.tok { padding: 0.1em 0.15em; border-radius: 0.2em; }"""


def token_html(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    relevance: ArrayLike,
    *,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
    normalize: str | float = "symmetric",
    labels: Sequence[str] | None = None,
) -> str:
    """Render tokens coloured by relevance as a self-contained HTML document.

    Every token becomes one ``<span class="tok">`` (in order, and the only
    ``<span>`` elements in the document) whose background is red for positive
    and blue for negative relevance, with intensity ``|R| / scale``; the raw
    token and its relevance value are in the ``title=`` tooltip.  Text is
    HTML-escaped.  Subword markers are handled for display: WordPiece ``##x``
    is joined to the previous token without a space, and in sequences that use
    sentencepiece ``▁`` or GPT-2 ``Ġ`` word-start markers the marker is removed,
    marked tokens are preceded by a space and unmarked ones are joined.  The
    document uses only inline CSS and declares UTF-8.

    Parameters
    ----------
    tokens : list of str, or list of lists of str
        One sequence, or several (one row each).
    relevance : array-like or torch.Tensor
        One value per token: 1-D for one sequence; a list of 1-D arrays or a
        2-D array ``(rows, tokens)`` for several.
    title : str, optional
        Heading and ``<title>`` of the page.
    path : str or os.PathLike, optional
        If given, the document is also written there (UTF-8).
    normalize : {"symmetric", "global", "none"} or float, default "symmetric"
        ``"symmetric"`` divides each row by its own ``max|R|``; ``"global"`` by
        the ``max|R|`` over all rows (comparable colours); ``"none"`` uses the
        values as they are (clipped to ``[-1, 1]``); a number is used as the
        common scale.
    labels : list of str, optional
        One label per row, shown above it.

    Returns
    -------
    str
        The HTML document.

    Examples
    --------
    >>> doc = token_html(["The", "cat", "<b>"], [0.5, -1.0, 0.0])
    >>> doc.count('<span class="tok"')
    3
    >>> "&lt;b&gt;" in doc and "<b>" not in doc
    True
    """
    rows, values, labels = _token_rows(tokens, relevance, labels)
    signed_rows = _token_signed(values, normalize)
    heading = "Token relevance" if title is None else str(title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(heading)}</title>",
        f"<style>\n{_HTML_CSS}\n</style>",
        "</head>",
        "<body>",
    ]
    if title is not None:
        parts.append(f"<h1>{html.escape(heading)}</h1>")
    parts.append(
        '<div class="legend"><div>negative</div><div class="bar"></div><div>positive</div></div>'
    )
    for r, (row, raw, signed) in enumerate(zip(rows, values, signed_rows)):
        bg, fg = _token_colours(signed)
        pieces = []
        for i, ((text, space), tok) in enumerate(zip(_token_display(row), row)):
            tooltip = html.escape(f"{tok}: {raw[i]:+.4g}", quote=True)
            style = (
                f"background-color:rgb({bg[i, 0]},{bg[i, 1]},{bg[i, 2]});"
                f"color:rgb({fg[i, 0]},{fg[i, 1]},{fg[i, 2]})"
            )
            pieces.append(
                (" " if space else "")
                + f'<span class="tok" style="{style}" title="{tooltip}">'
                + f"{html.escape(text, quote=True)}</span>"
            )
        label = (
            ""
            if labels is None
            else f'<div class="label">{html.escape(labels[r])}</div>'
        )
        parts.append(
            f'<div class="row">{label}<div class="seq">{"".join(pieces)}</div></div>'
        )
    parts += ["</body>", "</html>", ""]
    doc = "\n".join(parts)
    if path is not None:
        Path(path).write_text(doc, encoding="utf-8")
    return doc


def _terminal_safe(text: str) -> str:
    """Make control characters visible so a token cannot inject escape sequences."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\n":
            out.append("\u21b5")
        elif ch == "\t":
            out.append("\u21e5")
        elif code < 32 or 127 <= code < 160:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_terminal(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    relevance: ArrayLike,
    *,
    normalize: str | float = "symmetric",
    labels: Sequence[str] | None = None,
) -> str:
    """Render tokens with ANSI 24-bit background colours for a terminal.

    Positive relevance gives a red background, negative a blue one, with
    intensity ``|R| / scale`` (zero is white); the text colour is chosen for
    contrast.  Each token is followed by a reset code (``ESC[0m``) and the
    string ends with one, so it can be ``print()``-ed directly.  Subword markers
    are handled as in :func:`token_html`; control characters inside tokens are
    shown escaped.  Several rows give several lines.

    Parameters
    ----------
    tokens : list of str, or list of lists of str
        One sequence, or several (one line each).
    relevance : array-like or torch.Tensor
        One value per token (see :func:`token_html`).
    normalize : {"symmetric", "global", "none"} or float, default "symmetric"
        Scaling of the colour intensity, as in :func:`token_html`.
    labels : list of str, optional
        One label per row, printed before it.

    Returns
    -------
    str
        The coloured text; :func:`strip_ansi` recovers the plain text.

    Examples
    --------
    >>> s = token_terminal(["good", "bad"], [1.0, -1.0])
    >>> strip_ansi(s)
    'good bad'
    >>> print(s)  # doctest: +SKIP
    """
    rows, values, labels = _token_rows(tokens, relevance, labels)
    lines = []
    for r, (row, signed) in enumerate(zip(rows, _token_signed(values, normalize))):
        bg, fg = _token_colours(signed)
        pieces = [] if labels is None else [f"{_terminal_safe(labels[r])}: "]
        for i, (text, space) in enumerate(_token_display(row)):
            pieces.append(
                (" " if space else "")
                + f"\x1b[48;2;{bg[i, 0]};{bg[i, 1]};{bg[i, 2]}m"
                + f"\x1b[38;2;{fg[i, 0]};{fg[i, 1]};{fg[i, 2]}m"
                + _terminal_safe(text)
                + _ANSI_RESET
            )
        lines.append("".join(pieces))
    out = "\n".join(lines)
    return out if out.endswith(_ANSI_RESET) else out + _ANSI_RESET


def strip_ansi(s: str) -> str:
    """Remove ANSI escape sequences (colours, cursor codes) from a string.

    Parameters
    ----------
    s : str
        Text possibly containing escape sequences.

    Returns
    -------
    str
        The visible text.

    Examples
    --------
    >>> strip_ansi("\\x1b[48;2;255;0;0mhot\\x1b[0m")
    'hot'
    """
    return _ANSI_RE.sub("", s)


_MATRIX_CSS = """\
table.matrix { border-collapse: collapse; font-size: 0.8em; }
table.matrix th { font-weight: normal; padding: 0.1em 0.3em; white-space: nowrap; }
table.matrix th.src { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
table.matrix td { width: 1.2em; height: 1.2em; padding: 0; }
table.matrix tr.sel th.tgt { font-weight: bold; outline: 2px solid #333; }
table.matrix tr:hover td { outline: 1px solid #888; }
#detail { margin: 1em 0; line-height: 1.9; white-space: pre-wrap; min-height: 2em; }"""

_MATRIX_JS = """\
function pick(row) {
  document.querySelectorAll('table.matrix tr.sel').forEach(function (r) { r.classList.remove('sel'); });
  row.classList.add('sel');
  var cells = row.querySelectorAll('td');
  var out = [];
  for (var i = 0; i < cells.length; i++) {
    out.push('<span class="tok" style="' + cells[i].getAttribute('style') + '" title="' +
             cells[i].getAttribute('title') + '">' + cells[i].getAttribute('data-tok') + '</span>');
  }
  document.getElementById('detail').innerHTML = '<strong>' + row.querySelector('th').innerHTML + '</strong>: ' + out.join(' ');
}
document.querySelectorAll('table.matrix tr.row').forEach(function (r) {
  r.addEventListener('click', function () { pick(r); });
});
var first = document.querySelector('table.matrix tr.row'); if (first) { pick(first); }"""


def matrix_html(
    sources: Sequence[str],
    targets: Sequence[str],
    relevance: ArrayLike,
    *,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
    normalize: str | float = "symmetric",
) -> str:
    """Render a source x target relevance matrix (e.g. ``targets.each_token()``'s) as an interactive HTML page.

    One table row per target (its label in a ``<th class="tgt">``), one ``<td>`` per source token coloured like
    :func:`token_html` (red positive, blue negative; the value in the ``title=`` tooltip). Clicking a row shows it
    as a token heatmap above the table (the first row is shown on load). Text is HTML-escaped; the page is
    self-contained (inline CSS and script, UTF-8).

    Parameters
    ----------
    sources : list of str
        The tokens relevance is assigned to (the columns).
    targets : list of str
        One label per explained target (the rows), e.g. the generated tokens.
    relevance : array-like or torch.Tensor
        ``(len(targets), len(sources))``.
    title : str, optional
        Heading and ``<title>`` of the page.
    path : str or os.PathLike, optional
        If given, the document is also written there (UTF-8).
    normalize : {"symmetric", "global", "none"} or float, default "symmetric"
        As for :func:`token_html`: per row, or over the whole matrix (``"global"``).

    Returns
    -------
    str
        The HTML document.

    Examples
    --------
    >>> doc = matrix_html(["a", "<b>"], ["x", "y"], [[1.0, -1.0], [0.5, 0.0]])
    >>> doc.count('<td '), doc.count('<tr class="row"'), "&lt;b&gt;" in doc and "<b>" not in doc
    (4, 2, True)
    """
    values = _as_float(relevance)
    if values.ndim != 2 or values.shape != (len(targets), len(sources)):
        raise ValueError(
            f"matrix_html: relevance has shape {values.shape}, expected (targets, sources) = "
            f"({len(targets)}, {len(sources)})"
        )
    signed = _token_signed(list(values), normalize)
    heading = "Relevance per target" if title is None else str(title)
    head = "".join(f'<th class="src">{html.escape(s)}</th>' for s in sources)
    rows = []
    for label, raw, sig in zip(targets, values, signed):
        bg, fg = _token_colours(sig)
        cells = "".join(
            f'<td style="background-color:rgb({bg[i, 0]},{bg[i, 1]},{bg[i, 2]});color:rgb({fg[i, 0]},{fg[i, 1]},'
            f'{fg[i, 2]})" title="{html.escape(f"{sources[i]}: {raw[i]:+.4g}", quote=True)}" '
            f'data-tok="{html.escape(sources[i], quote=True)}"></td>'
            for i in range(len(sources))
        )
        rows.append(f'<tr class="row"><th class="tgt">{html.escape(label)}</th>{cells}</tr>')
    doc = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(heading)}</title>", f"<style>\n{_HTML_CSS}\n{_MATRIX_CSS}\n</style>", "</head>",
        "<body>", f"<h1>{html.escape(heading)}</h1>",
        '<div class="legend"><div>negative</div><div class="bar"></div><div>positive</div></div>',
        '<div id="detail"></div>',
        f'<table class="matrix"><tr><th></th>{head}</tr>', *rows, "</table>",
        f"<script>\n{_MATRIX_JS}\n</script>", "</body>", "</html>", "",
    ])
    if path is not None:
        Path(path).write_text(doc, encoding="utf-8")
    return doc
