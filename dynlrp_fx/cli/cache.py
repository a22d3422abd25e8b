"""``dynlrp cache``: where the persistent compile cache is, how large it is, and clearing it
(:mod:`dynlrp_fx.cache`)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import cache

__all__ = ["register_cli", "run"]


def run(args: argparse.Namespace) -> int:
    """Run ``dynlrp cache info|clear``; returns the exit code."""
    if args.action == "clear":
        n = cache.clear()
        print(f"removed {n} compile cache entr{'y' if n == 1 else 'ies'} from {cache.cache_dir()}")
        return 0
    st = cache.info()
    print(f"compile cache: {st['dir']}")
    print(f"  {'on' if st['enabled'] else 'off (DYNLRP_CACHE=0)'}; {st['entries']} entries, "
          f"{st['bytes'] / 2**20:.1f} MiB of {st['bound_bytes'] / 2**20:.0f} MiB (DYNLRP_CACHE_SIZE_MB)")
    print("  move it with DYNLRP_CACHE_DIR; compile(..., cache=False) or DYNLRP_CACHE=0 turns it off")
    return 0


def register_cli(sub: Any) -> None:
    """Add the ``cache`` subcommand."""
    p = sub.add_parser(
        "cache",
        help="show or clear the persistent compile cache",
        description="The compile cache keeps every compiled relevance program on disk, so that compiling the same "
        "model code, configuration and input spec again (in any process) skips tracing. 'info' shows its folder "
        "and size; 'clear' removes every entry (do it after changing code the cache key cannot see, such as a "
        "global flag your model reads).",
    )
    p.add_argument("action", choices=("info", "clear"), nargs="?", default="info")
    p.set_defaults(func=run)
