"""The demo (digits CNN, pretrained MiniLM) and the ``dynlrp explain`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dynlrp_fx as dynlrp
from dynlrp_fx.cli import main
from tests import _workflow_factories as factories

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.height, im.width


def test_digits_demo_trains_explains_and_writes_a_png_of_the_expected_size(tmp_path):
    from dynlrp_fx.demo import digits_demo

    s = digits_demo(tmp_path, n=4, scale=4, verbose=False)
    assert s.extra["accuracy"] > 0.9
    assert s.conservation_error < 1e-4
    png = tmp_path / "digits.png"
    assert s.files == [png]
    # image_grid layout: 1 row x 4 columns of (8*4)-pixel tiles, 2-pixel padding, 16-pixel titles
    pytest.importorskip("matplotlib")
    tile_h, tile_w = 8 * 4 + 16, 8 * 4
    assert _png_size(png) == (tile_h + 2 + 2, 4 * (tile_w + 2) + 2)


def _run_cli(*argv: str) -> int:
    return main(list(argv))


def test_explain_cli_matches_the_python_api(tmp_path, capsys):
    x = torch.randn(3, 6)
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    model = factories.make_mlp()
    ref = dynlrp.compile(model, x, rules="lrp0", backend="eager")(x, target=1)
    for name in ("x.pt", "x.npy"):
        out = tmp_path / f"r-{name}.pt"
        rc = _run_cli(
            "explain",
            "--model",
            "tests._workflow_factories:make_mlp",
            "--input",
            str(tmp_path / name),
            "--target",
            "1",
            "--rules",
            "lrp0",
            "--out",
            str(out),
        )
        assert rc == 0
        saved = torch.load(out, weights_only=True)
        torch.testing.assert_close(saved["relevance"], ref.relevance)
        torch.testing.assert_close(saved["seed"], ref.conservation.seed)
        assert saved["target"].tolist() == [1, 1, 1]
    text = capsys.readouterr().out
    assert text.count("sample 2: output[1]") == 2


def test_explain_cli_png_and_errors(tmp_path, capsys):
    x = torch.rand(2, 1, 8, 8)
    torch.save(x, tmp_path / "img.pt")
    png = tmp_path / "r.png"
    rc = _run_cli(
        "explain",
        "--model",
        "tests._workflow_factories:make_cnn",
        "--input",
        str(tmp_path / "img.pt"),
        "--png",
        str(png),
    )
    assert rc == 0
    assert _png_size(png) == (8 + 4, 2 * (8 + 2) + 2)
    rc = _run_cli("explain", "--model", "tests._workflow_factories:nope", "--input", str(tmp_path / "img.pt"))
    assert rc == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_writes_html_and_png(tmp_path):
    """`python -m dynlrp_fx demo --out DIR`: the pretrained MiniLM and the digits CNN (about a minute)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dynlrp_fx", "demo", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(tmp_path.glob("*.html")) and list(tmp_path.glob("*.png"))
    html = (tmp_path / "similarity.html").read_text(encoding="utf-8")
    for tok in ("guitar", "stage", "performs", "kitten", "couch", "sofa"):
        assert tok in html
    # the similarity of two paraphrases beats that of unrelated sentences, and relevance is conserved
    assert "max conservation error" in proc.stdout
    assert "zero-shot topic" in proc.stdout and "sports 0." in proc.stdout.split("zero-shot topic")[1].splitlines()[0]
