"""Test environment (offline Hugging Face, two threads) and fixtures only; shared helpers live in
``tests/helpers.py`` (tests never import this module)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the compile cache stays on (the default a user has) but never touches the user's cache: one folder per test run
if "DYNLRP_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DYNLRP_CACHE_DIR"] = tempfile.mkdtemp(prefix="dynlrp-test-cache-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

