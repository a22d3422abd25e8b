"""Tests for dynlrp_fx.viz (heatmaps, overlays, grids, PNG output, token heatmaps)."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dynlrp_fx import viz
from dynlrp_fx.viz import (
    heatmap,
    image_grid,
    overlay,
    save_image,
    strip_ansi,
    token_html,
    token_terminal,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WHITE = [255, 255, 255]


def _regions_map() -> np.ndarray:
    """(1, 4, 9): positive columns 0-2, zero columns 3-5, negative columns 6-8."""
    rel = np.zeros((1, 4, 9))
    rel[:, :, 0:3] = 2.0
    rel[:, :, 6:9] = -2.0
    return rel


# ---------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------


def test_heatmap_positive_red_negative_blue_zero_white() -> None:
    img = heatmap(_regions_map())
    assert img.shape == (4, 9, 3) and img.dtype == np.uint8
    pos, zero, neg = (
        img[:, 0:3].reshape(-1, 3),
        img[:, 3:6].reshape(-1, 3),
        img[:, 6:9].reshape(-1, 3),
    )
    assert (pos[:, 0] == 255).all() and (pos[:, 1:] < 60).all()  # red
    assert (neg[:, 2] == 255).all() and (neg[:, :2] < 60).all()  # blue
    assert (zero == 255).all()  # white


def test_heatmap_intensity_grows_with_magnitude() -> None:
    rel = np.array([[0.25, 0.5, 1.0, -0.5]])
    img = heatmap(rel)[0]
    # weaker positive relevance is paler (more green/blue mixed into red)
    assert img[0, 1] > img[1, 1] > img[2, 1]
    assert img[0].tolist() == [255, 191, 191]
    assert img[3].tolist() == [128, 128, 255]


def test_heatmap_negation_mirrors_colours() -> None:
    rel = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    img, neg = heatmap(rel), heatmap(-rel)
    assert not np.array_equal(img, neg)
    np.testing.assert_array_equal(neg, img[..., ::-1])


def test_heatmap_zero_map_is_centre_colour() -> None:
    with np.errstate(all="raise"):  # no division by zero / invalid values
        img = heatmap(torch.zeros(3, 5, 6))
        flat = heatmap(np.zeros((5, 6)), symmetric=False)
    assert img.shape == (5, 6, 3) and (img == 255).all()
    assert (flat == 255).all()


def test_heatmap_zero_map_matplotlib_cmap_centre() -> None:
    mpl = pytest.importorskip("matplotlib")
    img = heatmap(np.zeros((4, 4)), cmap="viridis")
    centre = np.rint(np.asarray(mpl.colormaps["viridis"](0.5))[:3] * 255).astype(
        np.uint8
    )
    assert (img == centre).all()


def test_heatmap_batch_shape_and_per_sample_normalisation() -> None:
    rel = np.random.default_rng(0).normal(size=(4, 3, 5, 7))
    rel[2] *= 1000.0  # a much larger sample must not wash out the others
    out = heatmap(rel)
    assert out.shape == (4, 5, 7, 3) and out.dtype == np.uint8
    for i in range(4):
        np.testing.assert_array_equal(out[i], heatmap(rel[i]))


def test_heatmap_level_saturates() -> None:
    rel = np.array([[1.0, 0.5, -0.25]])
    assert heatmap(rel)[0, 1].tolist() != [255, 0, 0]
    assert heatmap(rel, level=2.0)[0, 1].tolist() == [255, 0, 0]
    assert heatmap(rel, level=2.0)[0, 2].tolist() == [128, 128, 255]
    with pytest.raises(ValueError):
        heatmap(rel, level=0.0)


def test_heatmap_channel_reduce() -> None:
    rel = np.zeros((2, 1, 3))
    rel[0, 0] = [1.0, -1.0, 0.5]
    rel[1, 0] = [-3.0, 1.0, 0.0]
    summed = heatmap(rel, channel_reduce="sum")[0]  # [-2, 0, 0.5]
    assert summed[0].tolist() == [0, 0, 255] and summed[1].tolist() == WHITE
    absolute = heatmap(rel, channel_reduce="abs_sum")[0]  # [4, 2, 0.5]: never blue
    assert (absolute[:, 0] == 255).all() and (absolute[:, 2] < 255).all()
    maxabs = heatmap(rel, channel_reduce="max_abs")[0]  # [-3, -1, 0.5]
    assert (
        maxabs[0].tolist() == [0, 0, 255]
        and maxabs[1, 2] == 255
        and maxabs[2, 0] == 255
    )
    with pytest.raises(ValueError, match="channel_reduce"):
        heatmap(rel, channel_reduce="mean")


def test_heatmap_rejects_bad_shapes_and_handles_nan() -> None:
    with pytest.raises(ValueError):
        heatmap(np.zeros(5))
    rel = np.array([[1.0, np.nan, -np.inf]])
    with pytest.warns(RuntimeWarning):
        img = heatmap(rel)[0]
    assert img.tolist() == [[255, 0, 0], WHITE, [0, 0, 255]]


def test_heatmap_unknown_and_callable_cmap() -> None:
    def grey(values: np.ndarray) -> np.ndarray:
        return np.repeat(values[..., None], 3, axis=-1)

    img = heatmap(np.array([[-1.0, 0.0, 1.0]]), cmap=grey)[0]
    assert img.tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="colour map"):
        heatmap(np.ones((2, 2)), cmap="definitely-not-a-cmap")


def test_missing_matplotlib_raises_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=re.escape('pip install "dynlrp-fx[viz]"')):
        heatmap(np.ones((2, 2)), cmap="viridis")
    with pytest.raises(ImportError, match="dynlrp-fx"):
        image_grid([np.ones((2, 2))], titles=["a"])
    # the built-in colour map keeps working
    assert heatmap(np.ones((2, 2)))[0, 0].tolist() == [255, 0, 0]


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
        elements=st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_heatmap_property_finite_uint8_and_mirror(rel: np.ndarray) -> None:
    img = heatmap(rel)
    assert img.dtype == np.uint8 and img.shape == (*rel.shape[1:], 3)
    np.testing.assert_array_equal(heatmap(-rel), img[..., ::-1])
    # green is the shared "fade" channel: every pixel is white, red-ish or blue-ish
    assert ((img[..., 0] == 255) | (img[..., 2] == 255)).all()


# ---------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------


def test_overlay_shape_dtype_and_blend() -> None:
    image = torch.linspace(-5.0, 30.0, 3 * 6 * 7).reshape(3, 6, 7)  # arbitrary range
    rel = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(1))
    out = overlay(image, rel, alpha=0.4)
    assert out.shape == (6, 7, 3) and out.dtype == np.uint8
    # alpha=1 is the heatmap; alpha=0 is the min-max normalised image
    np.testing.assert_array_equal(overlay(image, rel, alpha=1.0), heatmap(rel))
    base = overlay(image, rel, alpha=0.0)
    assert base.min() == 0 and base.max() == 255
    assert (
        base[0, 0, 0] == 0 and base[-1, -1, 2] == 255
    )  # global min / max of the image


def test_overlay_uint8_hwc_image_and_batch() -> None:
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    rel = np.zeros((4, 5))
    rel[0, 0] = 1.0
    out = overlay(image, rel, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    # (200 + 255) / 2 = 227.5: the uint8 image is scaled by 1/255, not min-max normalised
    np.testing.assert_allclose(out[1, 1], [227.5] * 3, atol=0.5)
    np.testing.assert_allclose(out[0, 0], [227.5, 100, 100], atol=0.5)
    batch = overlay(np.random.rand(2, 3, 4, 5), np.random.randn(2, 3, 4, 5))
    assert batch.shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="shape"):
        overlay(np.zeros((3, 4, 6)), rel)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, rel, alpha=1.5)


# ---------------------------------------------------------------------------
# save_image / image_grid
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["auto", "pil", "matplotlib", "builtin"])
def test_save_image_roundtrip(tmp_path: Path, writer: str) -> None:
    mpimg = pytest.importorskip("matplotlib.image")
    if writer == "pil":
        pytest.importorskip("PIL")
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    out = save_image(rgb, tmp_path / "img.png", writer=writer)
    back = mpimg.imread(out)
    assert back.shape[:2] == (7, 11)
    np.testing.assert_array_equal(np.rint(back[..., :3] * 255).astype(np.uint8), rgb)


def test_save_image_relevance_map(tmp_path: Path) -> None:
    mpimg = pytest.importorskip("matplotlib.image")
    path = save_image(
        torch.tensor(_regions_map()), tmp_path / "rel.png", writer="builtin"
    )
    back = mpimg.imread(path)
    assert back.shape[:2] == (4, 9)
    np.testing.assert_array_equal(
        np.rint(back[..., :3] * 255).astype(np.uint8), heatmap(_regions_map())
    )
    with pytest.raises(ValueError, match="image_grid"):
        save_image(np.zeros((2, 3, 4, 4)), tmp_path / "batch.png")


def test_image_grid_size_arithmetic(tmp_path: Path) -> None:
    maps = [np.random.default_rng(i).normal(size=(3, 8, 10)) for i in range(5)]
    grid = image_grid(maps, ncols=3, padding=2, path=tmp_path / "grid.png")
    # 2 rows x 3 columns of 8x10 tiles with 2 px padding around each
    assert (
        grid.shape == (2 * (8 + 2) + 2, 3 * (10 + 2) + 2, 3) and grid.dtype == np.uint8
    )
    np.testing.assert_array_equal(grid[2:10, 2:12], heatmap(maps[0]))
    np.testing.assert_array_equal(grid[12:20, 14:24], heatmap(maps[4]))
    assert (grid[12:20, 26:36] == 255).all()  # the sixth cell is empty padding
    assert (tmp_path / "grid.png").stat().st_size > 0
    # fewer maps than columns: the grid shrinks to the number of maps
    assert image_grid(maps[:2], ncols=8, padding=1).shape == (10, 23, 3)


def test_image_grid_batch_overlays_and_titles() -> None:
    rel = torch.randn(5, 3, 8, 10, generator=torch.Generator().manual_seed(2))
    imgs = torch.rand(5, 3, 8, 10, generator=torch.Generator().manual_seed(3))
    grid = image_grid(rel, images=imgs, ncols=3, padding=0, alpha=0.3)
    assert grid.shape == (16, 30, 3)
    np.testing.assert_array_equal(grid[0:8, 10:20], overlay(imgs[1], rel[1], alpha=0.3))
    with pytest.raises(ValueError, match="images"):
        image_grid(rel, images=imgs[:2])
    pytest.importorskip("matplotlib")
    titled = image_grid(rel, ncols=3, padding=2, titles=list("abcde"), title_height=12)
    assert titled.shape == (2 * (8 + 12 + 2) + 2, 3 * (10 + 2) + 2, 3)
    # the title strip contains some dark (text) pixels on the white background
    assert titled[2:14, 2:12].min() < 128


# ---------------------------------------------------------------------------
# token heatmaps
# ---------------------------------------------------------------------------


class _Spans(HTMLParser):
    """Collect token spans (attributes and text) and the visible text of each row."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, str]] = []
        self.rows: list[str] = []
        self.span_tags = 0
        self._in_span = False
        self._in_seq = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "span":
            self.span_tags += 1
            self._in_span = True
            self.spans.append({**attr, "text": ""})
        elif tag == "div" and attr.get("class") == "seq":
            self._in_seq = True
            self.rows.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in_span = False
        elif tag == "div" and self._in_seq:
            self._in_seq = False

    def handle_data(self, data: str) -> None:
        if self._in_span:
            self.spans[-1]["text"] += data
        if self._in_seq:
            self.rows[-1] += data


def _parse(doc: str) -> _Spans:
    parser = _Spans()
    parser.feed(doc)
    return parser


def _background(span: dict[str, str]) -> tuple[int, int, int]:
    match = re.search(r"background-color:rgb\((\d+),(\d+),(\d+)\)", span["style"])
    assert match is not None
    r, g, b = (int(x) for x in match.groups())
    return r, g, b


def test_token_html_escaping_spans_order_and_colours(tmp_path: Path) -> None:
    tokens = ["The", "<b>", "cat", "&", 'say"s', "it's"]
    rel = np.array([0.1, 2.0, -1.5, 0.0, 0.3, -0.2])
    doc = token_html(tokens, rel, title="A <title>", path=tmp_path / "t.html")
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == doc
    assert doc.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in doc
    assert (
        "&lt;b&gt;" in doc
        and "<b>" not in doc
        and "<title>A &lt;title&gt;</title>" in doc
    )
    assert "&amp;" in doc and "say&quot;s" in doc
    assert (
        "http://" not in doc
        and "https://" not in doc
        and "<link" not in doc
        and "<script" not in doc
    )
    parsed = _parse(doc)
    assert parsed.span_tags == len(tokens) == doc.count("<span")
    assert [s["text"] for s in parsed.spans] == tokens
    r, g, b = _background(parsed.spans[1])  # strongest positive: red
    assert (r, g, b) == (255, 0, 0)
    r, g, b = _background(parsed.spans[2])  # negative: blue
    assert b == 255 and r == g < 100
    assert _background(parsed.spans[3]) == (255, 255, 255)
    assert "+2" in parsed.spans[1]["title"] and "-1.5" in parsed.spans[2]["title"]
    assert parsed.rows == ["The <b> cat & say\"s it's"]


def test_token_html_subword_markers() -> None:
    wordpiece = ["[CLS]", "un", "##believ", "##able", "!"]
    parsed = _parse(token_html(wordpiece, np.arange(5.0)))
    assert parsed.span_tags == 5
    assert [s["text"] for s in parsed.spans] == ["[CLS]", "un", "believ", "able", "!"]
    assert parsed.rows == ["[CLS] unbelievable !"]

    sentencepiece = ["\u2581Hello", ",", "\u2581wor", "ld", "\u2581"]
    parsed = _parse(token_html(sentencepiece, np.ones(5)))
    assert [s["text"] for s in parsed.spans] == ["Hello", ",", "wor", "ld", "\u2581"]
    assert parsed.rows[0].startswith("Hello, world")

    gpt2 = ["The", "\u0120cat", "\u0120sat", "s"]
    parsed = _parse(token_html(gpt2, -np.ones(4)))
    assert parsed.rows == ["The cat sats"] and parsed.span_tags == 4


def test_token_html_multiple_rows_with_labels() -> None:
    rows = [["a", "b"], ["c", "d", "e"]]
    rel = [torch.tensor([1.0, -1.0]), np.array([0.0, 0.5, 1.0])]
    doc = token_html(rows, rel, labels=["first <row>", "second"])
    parsed = _parse(doc)
    assert parsed.span_tags == 5 and [s["text"] for s in parsed.spans] == list("abcde")
    assert parsed.rows == ["a b", "c d e"]
    assert "first &lt;row&gt;" in doc and doc.index("first") < doc.index("second")
    # 2-D relevance array, global normalisation: row 2's 0.5 is half of row 1's 1.0
    parsed = _parse(
        token_html(
            [["x", "y"], ["z", "w"]],
            np.array([[1.0, 0.0], [0.5, 0.0]]),
            normalize="global",
        )
    )
    assert _background(parsed.spans[0]) == (255, 0, 0)
    assert _background(parsed.spans[2]) == (255, 128, 128)
    with pytest.raises(ValueError, match="tokens"):
        token_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="labels"):
        token_html(rows, rel, labels=["only one"])


def test_token_terminal_plain_text_and_codes() -> None:
    tokens = ["good", "neutral", "bad", "##ly"]
    out = token_terminal(tokens, [2.0, 0.0, -2.0, -1.0])
    plain = strip_ansi(out)
    assert plain == "good neutral badly"
    assert "\x1b[" not in plain and out.endswith("\x1b[0m")
    codes = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m", out)
    assert [tuple(map(int, c)) for c in codes[:3]] == [
        (255, 0, 0),
        (255, 255, 255),
        (0, 0, 255),
    ]
    assert codes[0] != codes[2]


def test_token_terminal_rows_and_control_characters() -> None:
    out = token_terminal(
        [["a", "\x1b[2Jevil"], ["b"]], [[1.0, -1.0], [0.0]], labels=["r1", "r2"]
    )
    lines = strip_ansi(out).split("\n")
    assert lines == ["r1: a \\x1b[2Jevil", "r2: b"]
    assert "\x1b[2J" not in out  # a token cannot inject a terminal command


def test_strip_ansi() -> None:
    assert (
        strip_ansi("\x1b[1;31mred\x1b[0m plain \x1b[38;2;1;2;3mx\x1b[0m")
        == "red plain x"
    )
    assert strip_ansi("no codes") == "no codes"


# ---------------------------------------------------------------------------
# module-level checks
# ---------------------------------------------------------------------------


def test_docstring_examples() -> None:
    result = doctest.testmod(viz, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


def test_public_functions_documented() -> None:
    for name in viz.__all__:
        func = getattr(viz, name)
        doc = func.__doc__ or ""
        assert "Parameters" in doc and "Returns" in doc and "Examples" in doc, name
        assert "return" in func.__annotations__, name


def test_works_without_matplotlib_and_pil(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("matplotlib", "PIL"):
            sys.modules[name] = None
        import numpy as np
        import dynlrp_fx.viz as viz
        rel = np.zeros((3, 4, 5)); rel[:, 0, 0] = 1.0
        assert viz.heatmap(rel)[0, 0].tolist() == [255, 0, 0]
        assert viz.token_html(["a"], [1.0]).count("<span") == 1
        viz.save_image(rel, {str(tmp_path / "nodeps.png")!r})
        try:
            viz.heatmap(rel, cmap="viridis")
        except ImportError as exc:
            assert 'pip install "dynlrp-fx[viz]"' in str(exc), exc
        else:
            raise AssertionError("no ImportError")
        assert "matplotlib" not in sys.modules or sys.modules["matplotlib"] is None
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    mpimg = pytest.importorskip("matplotlib.image")
    rel = np.zeros((3, 4, 5))
    rel[:, 0, 0] = 1.0
    back = np.rint(mpimg.imread(tmp_path / "nodeps.png")[..., :3] * 255).astype(
        np.uint8
    )
    np.testing.assert_array_equal(back, heatmap(rel))
