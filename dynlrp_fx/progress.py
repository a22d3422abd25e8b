"""Progress of long compiles: a tqdm bar over the stages of :func:`dynlrp_fx.compile`.

:func:`compile_progress` opens one bar for a compile; the code of each stage (tracing, the analysis and synthesis
passes, the backend, reading the compile cache) calls :func:`stage` when it starts. The bar appears only after
:data:`DELAY` seconds, so quick compiles (a cache hit, a small model) print nothing; it is shown when ``progress=True``
is passed, or by default when standard error is a terminal or the code runs in a notebook, or when ``DYNLRP_PROGRESS=1``; ``progress=False`` or
``DYNLRP_PROGRESS=0`` silences it. Without tqdm installed there is no bar.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["compile_progress", "stage", "DELAY"]

#: seconds a compile runs before its bar appears
DELAY = 2.0

_bar: contextvars.ContextVar[Any] = contextvars.ContextVar("dynlrp_progress_bar", default=None)


def _wanted(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    env = os.environ.get("DYNLRP_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget
        return True
    return sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


@contextlib.contextmanager
def compile_progress(progress: bool | None, what: str) -> Iterator[None]:
    """A progress bar for one compile of ``what`` (nested compiles reuse the outer bar)."""
    if _bar.get() is not None or not _wanted(progress):
        yield
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library itself
        yield
        return
    bar = tqdm(total=None, desc=f"dynlrp.compile({what})", delay=DELAY, leave=False, unit="stage",
               bar_format="{desc}: {postfix} [{elapsed}]", file=sys.stderr)
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        bar.close()


def stage(name: str) -> None:
    """Mark the start of a compile stage on the open bar (nothing when no bar is open)."""
    bar = _bar.get()
    if bar is not None:
        bar.set_postfix_str(name, refresh=True)
        bar.update(1)
