"""Test environment (offline Hugging Face, two threads) and fixtures only; shared helpers live in
``tests/helpers.py`` (tests never import this module)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the compile cache stays on (the default a user has) but never touches the user's cache: one folder per test run
# (made by the first process that loads this file, inherited by pytest-xdist workers and subprocesses, removed at exit)
if "DYNLRP_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DYNLRP_CACHE_DIR"] = tempfile.mkdtemp(prefix="dynlrp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DYNLRP_CACHE_DIR"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

