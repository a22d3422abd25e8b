"""Peak memory of eager graph execution (a deterministic measurement for tests and benchmarks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["peak_live_bytes"]


def _nbytes(v: Any, seen: set) -> int:
    if isinstance(v, torch.Tensor):
        try:
            st = v.untyped_storage()
            key = st.data_ptr()
            if key in seen or st.nbytes() == 0:
                return 0
            seen.add(key)
            return st.nbytes()
        except (RuntimeError, NotImplementedError):
            return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x, seen) for x in v)
    return 0


def peak_live_bytes(gm: fx.GraphModule, *args: Any) -> tuple[int, Any]:
    """Run ``gm`` node by node, freeing each value after its last use, and return ``(peak_bytes, outputs)``.

    ``peak_bytes`` is the largest total size of distinct tensor storages alive at once, not counting the
    arguments (parameters and inputs): the peak *extra* memory of eager execution of the graph (what
    ``GraphModule`` code does too: it drops each value after its last use). Deterministic, so it suits tests.
    """
    arg_ptrs = set()
    _nbytes(list(args), arg_ptrs)
    last_use: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    env: dict[fx.Node, Any] = {}
    it = iter(args)
    peak = 0
    out = None

    def live() -> int:
        seen = set(arg_ptrs)
        return sum(_nbytes(v, seen) for v in env.values())

    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op == "call_function":
                a = fx.node.map_arg(n.args, lambda x: env[x])
                k = fx.node.map_arg(n.kwargs, lambda x: env[x])
                env[n] = n.target(*a, **k)
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], lambda x: env[x])
            else:
                raise ValueError(f"peak_live_bytes: unsupported node {n.op} {n.name}")
            peak = max(peak, live())
            for a in n.all_input_nodes:
                if last_use.get(a) is n:
                    env.pop(a, None)
            if n not in last_use and n.op != "output":
                env.pop(n, None)
    return peak, out
