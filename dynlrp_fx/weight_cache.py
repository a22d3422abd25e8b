"""Values computed from the model's weights alone, computed once and reused while the weights stay the same.

A relevance program takes the model's parameters and buffers (its *state*) as its first inputs and reads them live
at every call. Some of its work depends on nothing else: a batch norm folded into the convolution before it
(``W * gamma / sqrt(var + eps)``), the gamma rule's modified weights ``W + gamma * W.clamp(min=0)``, a
per-channel scale. On ResNet-50 under ``epsilon_gamma_box`` that is ~1250 ops over every weight, 60 ms of a 350 ms
explanation at batch 1 on a 2-core CPU. :func:`split_state` cuts such a program into a *prologue* (state -> those
values) and a *main* program (everything, with the values as extra inputs), and :class:`WeightCache` runs the
prologue only when a state tensor it reads has changed since the last call: another tensor (a replaced parameter,
``load_state_dict`` with ``assign=True``, ``.to()``) or the same tensor written in place (an optimiser step,
``load_state_dict``, ``with torch.no_grad(): w.mul_(2)``), which bumps the tensor's version counter.

What it costs: the cached values stay alive between calls (:attr:`WeightCache.nbytes`; ResNet-50 under
``epsilon_gamma_box``: the folded and the modified weights, about twice the model's weights), and so do the state
tensors they were computed from until the next call (holding them keeps their memory from being reused by another
tensor, which would make a changed weight look unchanged). ``compile(..., cache_weights=False)`` turns it off.
Inference tensors (made under ``torch.inference_mode``) have no version counter and can be written in place without
a trace, so a call that reads one runs the prologue again.

The cut works on any lowered program, functional or after the eager backend's in-place buffer reuse: a node moves
to the prologue only if every input is state or moved, and a buffer that some op writes (in place or into
``out=``, found from the op's schema) is shared across the cut only if every write is in the prologue and every
main-program read of it or its views came after the last write in the original order (``reuse_buffers`` keeps
state-only values and the rest in separate buffers, so this holds for its output). Views of the prologue's results are left in the
main program (they cost nothing and would only hold a cached alias), as are values the program returns, so an
:class:`~dynlrp_fx.Explanation` never holds a cached tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["StateSplit", "split_state", "WeightCache"]


class StateSplit:
    """A program cut by :func:`split_state`: ``prologue(*state_read)`` returns the cached values, ``main(*args,
    *values)`` is the program (``args``: the original program's inputs); ``reads`` indexes the state inputs the
    prologue reads."""

    def __init__(self, prologue: fx.GraphModule, main: fx.GraphModule, reads: list[int], hoisted: int):
        self.prologue, self.main, self.reads = prologue, main, reads
        self.hoisted = hoisted  #: how many ops moved to the prologue


def _aliases(n: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
    """The inputs ``n`` writes, and the input its result is a view of (``None``: a new tensor), from its schema."""
    op = n.target
    if not isinstance(op, torch._ops.OpOverload):
        return [], None
    schema = op._schema
    ret = schema.returns[0].alias_info if len(schema.returns) == 1 else None
    written, alias_of = [], None
    for i, a in enumerate(schema.arguments):
        v = n.args[i] if i < len(n.args) and not a.kwarg_only else n.kwargs.get(a.name)
        if not isinstance(v, fx.Node) or a.alias_info is None:
            continue
        if a.alias_info.is_write:
            written.append(v)
        if ret is not None and set(a.alias_info.before_set) & set(ret.before_set):
            alias_of = v
    return written, alias_of


def split_state(gm: fx.GraphModule, n_state: int) -> StateSplit | None:
    """Cut ``gm`` (whose first ``n_state`` placeholders are the model's state) into a prologue of the ops that
    depend on state alone and a main program (see the module doc); ``None`` when nothing worth caching depends on
    state alone."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    state = set(placeholders[:n_state])
    output = next(n for n in reversed(nodes) if n.op == "output")
    calls = [n for n in nodes if n.op == "call_function"]
    info = {n: _aliases(n) for n in calls}
    root: dict[fx.Node, fx.Node] = {}  # node -> the node whose buffer it is (itself unless a view or a write)
    for n in nodes:
        alias_of = info[n][1] if n in info else None
        root[n] = root.get(alias_of, alias_of) if alias_of is not None else n
    written_roots = {root.get(w, w) for n in calls for w in info[n][0]}
    if written_roots & state:
        return None  # the program writes a parameter in place: never cache around that
    touching: dict[fx.Node, set[fx.Node]] = {}  # written buffer -> every op that makes, writes, views or reads it
    writers: dict[fx.Node, list[fx.Node]] = {}  # written buffer -> the ops that write it
    for n in calls:
        for v in (n, *n.all_input_nodes):
            r = root.get(v, v)
            if r in written_roots:
                touching.setdefault(r, set()).add(n)
        for w in info[n][0]:
            writers.setdefault(root.get(w, w), []).append(n)
    pos = {n: i for i, n in enumerate(nodes)}

    banned: set[fx.Node] = set()
    while True:
        moved: set[fx.Node] = set()
        for n in calls:
            ins = n.all_input_nodes
            if n not in banned and ins and all(a in state or a in moved for a in ins) and not (
                    isinstance(n.target, torch._ops.OpOverload)
                    and torch.Tag.nondeterministic_seeded in n.target.tags):
                moved.add(n)
        new = set()
        for r, group in touching.items():  # a written buffer shared across the cut
            inside = group & moved
            if not inside or inside == group:
                continue
            # the main program may read it only where the original program read it after its last write, and
            # may never write it (the prologue runs before the whole main program, and only once)
            last_write = max(pos[w] for w in writers[r])
            if any(w not in moved for w in writers[r]) or any(pos[u] < last_write for u in group - moved):
                new |= inside
        for n in moved:  # views and returned values at the edge stay in the main program
            edge = [u for u in n.users if u not in moved]
            if edge and ((info[n][1] is not None and not info[n][0]) or output in edge):
                new.add(n)
        if not new - banned:
            break
        banned |= new
    boundary = [n for n in calls if n in moved and any(u not in moved for u in n.users)]
    if not boundary:
        return None

    reads = [i for i, p in enumerate(placeholders[:n_state]) if any(u in moved for u in p.users)]
    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in reads:
        env[placeholders[i]] = pg.placeholder(placeholders[i].name)
    for n in calls:
        if n in moved:
            env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(tuple(env[b] for b in boundary))

    mg = fx.Graph()
    menv: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in moved:
            continue
        menv[n] = mg.node_copy(n, lambda a: menv[a])
        if n is placeholders[-1]:
            for b in boundary:
                menv[b] = mg.placeholder(f"cached_{b.name}")
                menv[b].meta = dict(b.meta)
    return StateSplit(fx.GraphModule(gm, pg), fx.GraphModule(gm, mg), reads, len(moved))


def _version_key(state: list[torch.Tensor]) -> tuple | None:
    """What identifies these tensors' current contents: storage address and version counter of each (``None``
    when one is an inference tensor, which has no version counter)."""
    key = []
    for t in state:
        if t.is_inference():
            return None
        key.append((t.data_ptr(), t._version, t.device))
    return tuple(key)


class WeightCache:
    """Runs a :class:`StateSplit`: the prologue when the state it reads changed since the last call (else its
    cached results), then the main program (``main`` may be the split's graph compiled for a backend)."""

    def __init__(self, split: StateSplit, main: Any):
        self.split, self.main = split, main
        self._cached: tuple[tuple, list[torch.Tensor], tuple] | None = None  # (key, state held, values)
        self.prologue_runs = 0  #: how many calls ran the prologue (the rest reused its results)

    def values(self, state: list[torch.Tensor]) -> tuple:
        """The prologue's results for this state, cached while the state is unchanged."""
        read = [state[i] for i in self.split.reads]
        key = _version_key(read)
        cached = self._cached
        if key is not None and cached is not None and cached[0] == key:
            return cached[2]
        values = tuple(self.split.prologue(*read))
        self.prologue_runs += 1
        # a new tensor's key is kept with the tensors it came from, so their memory is not reused under the key
        self._cached = (key, read, values) if key is not None else None
        return values

    def __call__(self, *args: Any) -> Any:
        return self.main(*args, *self.values(list(args)))

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached values (each storage counted once; 0 before the first call)."""
        if self._cached is None:
            return 0
        seen = {}
        for v in self._cached[2]:
            if isinstance(v, torch.Tensor):
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def clear(self) -> None:
        """Drop the cached values (the next call computes them again)."""
        self._cached = None
