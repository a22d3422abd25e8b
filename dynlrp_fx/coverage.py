"""Rule coverage: which ATen ops a model uses, which rule class each gets, and whether anything is uncovered.

:func:`coverage` traces a model exactly as :func:`dynlrp_fx.compile` does and reports, for every ATen op in the
graph, its node count, rule class(es) and the module paths that use it. Nothing is raised for uncovered ops: they
are listed (with their module paths) in the report, and the CLI exits 1.

Node counts (DynamicLRP reports coverage of autograd nodes; we count ATen nodes of the traced Core-ATen graph):

* ``nodes``: every ``call_function`` node except ``operator.getitem`` (tuple unpacking is not an op).
* ``relevant``: the *relevant data nodes*, those that relevance can reach: they depend on an explained input
  (float, or token ids through an embedding) and lie on a path to the explained output. Each needs a rule.
* ``covered``: relevant nodes whose op has an entry in the op table (:mod:`dynlrp_fx.rules.table`).
* ``constant``: ``nodes - relevant``: shape arithmetic, parameter-only computations, mask building and values that
  do not reach the output. They carry no relevance by construction, so they need no rule.

Node coverage is ``covered / relevant`` (100% when nothing is uncovered). With ``explain=True`` the model is also
compiled (``backend="eager"``) and explained once on the example inputs, and the report records whether all
relevance is finite and the conservation-ledger error ``max_sample |seed - inputs - absorbed| / |seed|``.

Command line (:mod:`dynlrp_fx.cli.coverage`)::

    dynlrp coverage --model torchvision:resnet18 --input-shape 2,3,64,64
    dynlrp coverage --zoo [--names gpt2,bert] [--json | --markdown [--non-core]]

Exit code 1 when any op is uncovered (or a model fails to trace/explain or gives non-finite relevance).
"""

from __future__ import annotations

import json
import math
import operator
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "OpRow",
    "CoverageReport",
    "coverage",
    "zoo_coverage",
    "render_markdown",
    "render_json",
    "render_text",
    "non_core_ops",
    "render_non_core_markdown",
]


@dataclass
class OpRow:
    """One ATen op of a traced model."""

    op: str  #: overload name, e.g. ``aten.convolution.default``
    count: int  #: nodes with this op (relevant or not)
    relevant: int  #: relevant data nodes with this op (they need a rule)
    kind: str | None  #: op-table kind (``route``, ``affine``, ...) or ``None`` (no table entry)
    rule_classes: list[str]  #: rule classes of its relevant nodes (sorted)
    rules: list[str]  #: rule names assigned to its relevant nodes (sorted; empty without a table entry)
    module_paths: list[str]  #: module paths of its nodes (``<root>`` for the top module), in graph order
    covered: bool  #: every relevant node of this op has a rule (True for ops without relevant nodes)


@dataclass
class CoverageReport:
    """Rule coverage (and optionally one explanation's conservation ledger) of one model.

    ``error`` is set (and everything else may be empty) when the model could not be built, traced or explained.
    """

    name: str
    modality: str = ""
    nodes: int = 0
    relevant: int = 0
    covered_nodes: int = 0
    constant: int = 0
    unique_ops: int = 0
    rows: list[OpRow] = field(default_factory=list)
    rules: str = ""
    explained: bool = False
    finite: bool | None = None
    conservation_error: float | None = None  #: max over samples of the per-sample ledger error
    #: ledger error of the batch totals, ``|sum seed - sum inputs - sum absorbed| / |sum seed|``: the meaningful one
    #: for outputs that mix samples (CLIP's ``logits_per_image`` compares every image with every text)
    conservation_error_total: float | None = None
    inputs: list[str] = field(default_factory=list)  #: inputs that received relevance (``Explanation.inputs``)
    output: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def node_coverage(self) -> float:
        """Covered share of the relevant data nodes, in percent (100 when the model has none)."""
        return 100.0 * self.covered_nodes / self.relevant if self.relevant else 100.0

    @property
    def uncovered(self) -> dict[str, list[str]]:
        """``{op: module paths}`` of every op with relevant nodes but no rule."""
        return {r.op: r.module_paths for r in self.rows if not r.covered}

    @property
    def ok(self) -> bool:
        """Fully covered, traced without error, and (if explained) with finite relevance."""
        return (
            self.error is None
            and not self.uncovered
            and self.covered_nodes == self.relevant
            and self.finite is not False
        )

    def to_dict(self, ops: bool = True) -> dict[str, Any]:
        """JSON-ready dict; ``covered`` is the node coverage in percent."""
        d = {
            "name": self.name,
            "modality": self.modality,
            "nodes": self.nodes,
            "relevant_nodes": self.relevant,
            "covered_nodes": self.covered_nodes,
            "constant_nodes": self.constant,
            "covered": round(self.node_coverage, 4),
            "unique_ops": self.unique_ops,
            "uncovered": self.uncovered,
            "rules": self.rules,
            "output": self.output,
            "explained": self.explained,
            "finite": self.finite,
            "conservation_error": self.conservation_error,
            "conservation_error_total": self.conservation_error_total,
            "inputs": list(self.inputs),
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "ok": self.ok,
        }
        if ops:
            d["ops"] = [asdict(r) for r in self.rows]
        return d

    def __str__(self) -> str:
        return render_text([self])


def _op_name(target: Any) -> str:
    return str(target)


def _strip(path: str, prefix: str) -> str:
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    elif prefix and path == prefix.rstrip("."):
        path = ""
    return path or "<root>"


def _analyse(analysis, report: CoverageReport) -> None:
    """Fill ``report``'s node counts and op rows from an analysis (the explainer's own ``analysis`` stage, run
    without raising for uncovered ops)."""
    from .passes.nodes import module_path
    from .rules.table import lookup
    from .trace import _OutputWrapper

    traced = analysis.traced
    gm = analysis.graph
    prefix = "model." if isinstance(traced.module_root, _OutputWrapper) else ""

    rows: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        name = _op_name(node.target)
        spec = lookup(node.target)
        row = rows.setdefault(
            name,
            {
                "count": 0,
                "relevant": 0,
                "kind": spec.kind if spec else None,
                "classes": set(),
                "rules": set(),
                "paths": {},
                "covered": True,
            },
        )
        row["count"] += 1
        ann = node.meta.get("dynlrp")
        path = _strip(ann.module_path if ann is not None else module_path(node), prefix)
        row["paths"].setdefault(path, None)
        report.nodes += 1
        if ann is None or not ann.relevant:
            continue
        row["relevant"] += 1
        report.relevant += 1
        if spec is None:
            row["covered"] = False
            continue
        report.covered_nodes += 1
        if ann.rule_class:
            row["classes"].add(ann.rule_class)
        if ann.rule is not None:
            row["rules"].add(getattr(ann.rule, "name", type(ann.rule).__name__))
    report.constant = report.nodes - report.relevant
    report.unique_ops = len(rows)
    report.rows = [
        OpRow(
            op,
            r["count"],
            r["relevant"],
            r["kind"],
            sorted(r["classes"]),
            sorted(r["rules"]),
            list(r["paths"]),
            r["covered"],
        )
        for op, r in sorted(rows.items(), key=lambda kv: (-kv[1]["relevant"], -kv[1]["count"], kv[0]))
    ]


def _explain(model, analysis, args: tuple, kwargs: dict, report: CoverageReport) -> None:
    from .explainer import Explainer

    explainer = Explainer(model, analysis.traced, analysis.composite, backend="eager", analysis=analysis)
    expl = explainer(*args, **kwargs)
    tensors = [expl.output, expl.absorbed, *expl.inputs.values()]
    report.finite = all(bool(torch.isfinite(t.float()).all()) for t in tensors if isinstance(t, torch.Tensor))
    err = expl.conservation.error
    report.conservation_error = float(err.max()) if err.numel() else 0.0
    c = expl.conservation
    seed = float(c.seed.double().sum())
    gap = abs(seed - float(c.inputs.double().sum()) - float(c.absorbed.double().sum()))
    report.conservation_error_total = gap / max(abs(seed), torch.finfo(torch.float64).tiny)
    if not math.isfinite(report.conservation_error):
        report.finite = False
    report.inputs = list(expl.inputs)
    report.explained = True


def coverage(
    model: nn.Module,
    example_inputs: Any = (),
    *,
    example_kwargs: dict | None = None,
    output: Any = None,
    rules: Any = None,
    explain: bool = True,
    name: str | None = None,
    modality: str = "",
) -> CoverageReport:
    """Report the rule coverage of ``model`` on these example inputs.

    Parameters
    ----------
    model, example_inputs, example_kwargs, output, rules:
        As for :func:`dynlrp_fx.compile` (``rules`` only changes the ``rules`` column and the explanation).
    explain:
        When every relevant op is covered, also compile with ``backend="eager"`` and explain the example inputs
        once (argmax target), recording ``finite``, ``conservation_error`` and the ``inputs`` that received
        relevance.
    name, modality:
        Labels for the report (default: the model's class name).

    Returns
    -------
    CoverageReport
        Per-op rows (op, node count, relevant count, rule classes, module paths, covered) and totals. Trace
        failures are raised (:class:`dynlrp_fx.DynlrpTraceError`); uncovered ops are *reported*, not raised.

    Example
    -------
    >>> rep = dynlrp.coverage(model, torch.randn(2, 3, 32, 32))  # doctest: +SKIP
    >>> rep.node_coverage, rep.uncovered, rep.conservation_error  # doctest: +SKIP
    """
    from .presets import resolve
    from .program import Analysis
    from .trace import trace

    t0 = time.perf_counter()
    composite = resolve(rules)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    report = CoverageReport(name=name or type(model).__name__, modality=modality, rules=composite.name)
    traced = trace(model, args, kwargs, output=output)
    report.output = traced.output_name
    analysis = Analysis(traced, composite, strict=False)  # the pipeline's analysis stage, as compile runs it
    _analyse(analysis, report)
    if explain and not report.uncovered:
        _explain(model, analysis, args, kwargs, report)
    report.seconds = time.perf_counter() - t0
    return report


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def entry_coverage(entry, *, full: bool = False, rules=None, explain: bool = True) -> CoverageReport:
    """Coverage report of one zoo entry (built with its example inputs and explained output)."""
    model, args, kwargs = entry.build(full=full)
    return coverage(
        model,
        tuple(args),
        example_kwargs=dict(kwargs or {}),
        output=entry.output,
        rules=rules,
        explain=explain,
        name=entry.name,
        modality=entry.modality,
    )


def zoo_coverage(
    names: Iterable[str] | None = None,
    *,
    full: bool = False,
    rules: Any = None,
    explain: bool = True,
    progress: Callable[[CoverageReport], None] | None = None,
) -> list[CoverageReport]:
    """:func:`coverage` of zoo models (:mod:`dynlrp_fx.zoo`; all of them by default).

    A model that fails to build, trace or explain gets a report with ``error`` set instead of raising, so one
    broken entry does not hide the others. ``full=True`` builds the real-size configurations (slow).
    ``progress`` is called with each report as it is finished.
    """
    from . import zoo

    reports = []
    for nm in list(names) if names is not None else zoo.names():
        entry = zoo.get(nm)
        t0 = time.perf_counter()
        try:
            rep = entry_coverage(entry, full=full, rules=rules, explain=explain)
        except Exception as e:  # noqa: BLE001 - reported per model
            rep = CoverageReport(name=entry.name, modality=entry.modality, error=_first_line(e))
            rep.seconds = time.perf_counter() - t0
            rep.traceback = traceback.format_exc()  # type: ignore[attr-defined]
        reports.append(rep)
        if progress is not None:
            progress(rep)
    return reports


# -- rendering -----------------------------------------------------------------------------------------------------
def _fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.1e}"


def render_markdown(reports: list[CoverageReport], *, title: str | None = None) -> str:
    """A markdown table with the DynamicLRP paper's columns (model, modality, nodes, unique ops, covered) plus
    relevant/constant nodes and the conservation-ledger error, then a total row and any uncovered ops."""
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += [
        "| model | modality | nodes | unique ops | relevant nodes | constant nodes | covered | conservation error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        if r.error:
            lines.append(f"| {r.name} | {r.modality} | - | - | - | - | error | {r.error.replace('|', '/')} |")
            continue
        cov = f"{r.node_coverage:.2f}%"
        err = _fmt_err(r.conservation_error)
        if r.conservation_error is not None and r.conservation_error_total is not None and r.conservation_error > 1e-3:
            err += f" (batch total {_fmt_err(r.conservation_error_total)})"
        lines.append(
            f"| {r.name} | {r.modality} | {r.nodes} | {r.unique_ops} | {r.relevant} | {r.constant} | {cov} | {err} |"
        )
    ok = [r for r in reports if not r.error]
    if len(reports) > 1:
        nodes = sum(r.nodes for r in ok)
        rel = sum(r.relevant for r in ok)
        cov = sum(r.covered_nodes for r in ok)
        uniq = len({row.op for r in ok for row in r.rows})
        pct = 100.0 * cov / rel if rel else 100.0
        errs = [r.conservation_error for r in ok if r.conservation_error is not None]
        lines.append(
            f"| **total ({len(reports)} models)** | | {nodes} | {uniq} | {rel} | {nodes - rel} | {pct:.2f}% | "
            f"{_fmt_err(max(errs) if errs else None)} (max) |"
        )
    bad = [(r.name, op, paths) for r in ok for op, paths in r.uncovered.items()]
    if bad:
        lines += ["", "Uncovered ops:", ""]
        for nm, op, paths in bad:
            lines.append(f"- {nm}: `{op}` used by {', '.join(f'`{p}`' for p in paths[:5])}")
    return "\n".join(lines) + "\n"


def render_json(reports: list[CoverageReport], *, ops: bool = False) -> str:
    """Machine-readable output: ``{"models": [...], "total": {...}}`` (per-op rows with ``ops=True``)."""
    ok = [r for r in reports if not r.error]
    total = {
        "models": len(reports),
        "nodes": sum(r.nodes for r in ok),
        "relevant_nodes": sum(r.relevant for r in ok),
        "covered_nodes": sum(r.covered_nodes for r in ok),
        "all_covered": all(r.ok for r in reports),
    }
    return json.dumps({"models": [r.to_dict(ops=ops) for r in reports], "total": total}, indent=2)


def render_text(reports: list[CoverageReport], *, ops: bool = True) -> str:
    """Human-readable report: per model the totals and (with ``ops``) one line per op."""
    out = []
    for r in reports:
        if r.error:
            out.append(f"{r.name}: ERROR {r.error}")
            continue
        expl = ""
        if r.explained:
            expl = f", finite={r.finite}, conservation error {_fmt_err(r.conservation_error)}, inputs {r.inputs}"
        out.append(
            f"{r.name}: {r.nodes} nodes ({r.relevant} relevant, {r.constant} constant), {r.unique_ops} unique ops, "
            f"covered {r.node_coverage:.2f}% ({r.covered_nodes}/{r.relevant}), rules={r.rules}{expl}"
        )
        if ops:
            for row in r.rows:
                mark = "  " if row.covered else "!!"
                cls = ",".join(row.rule_classes) or ("-" if row.kind is not None else "NO RULE")
                paths = ", ".join(row.module_paths[:4]) + (" ..." if len(row.module_paths) > 4 else "")
                out.append(f"  {mark} {row.op:<48} {row.count:>5} nodes {row.relevant:>5} relevant  {cls:<22} {paths}")
        for op, paths in r.uncovered.items():
            out.append(f"  UNCOVERED {op}: used by {', '.join(paths)}")
    return "\n".join(out)


# -- ops outside Core ATen -------------------------------------------------------------------------------------------
#: rule class(es) a kind gives at a node (``rules.table.classify``; multilinear and div depend on which operands are data)
_KIND_CLASSES = {
    "route": "route",
    "affine": "linear",
    "multilinear": "linear / product / bilinear",
    "unary": "identity",
    "div": "div / linear / normalizer",
}


def non_core_ops() -> list[dict[str, Any]]:
    """Every op outside Core ATen that tracing can leave in a graph and that has a relevance kind in the op table:
    not ``torch.Tag.core``, not decomposed by :func:`dynlrp_fx.trace.decomposition_table`, functional, and not a
    CompositeImplicitAutograd op (export decomposes those), plus the ops dynlrp's table keeps whole (SDPA). Also
    the ops dynlrp decomposes itself (:mod:`dynlrp_fx.decompositions`), with ``kind`` ``"decomposed"``. Rows:
    ``{"op", "kind", "rule_class"}``, sorted by op name."""
    from .decompositions import ATEN_DECOMPOSITIONS, LIBRARY_IMPLEMENTATIONS
    from .rules.table import OP_TABLE
    from .trace import KEEP_WHOLE, decomposition_table

    decomposed = decomposition_table()
    rows = []
    for op, spec in OP_TABLE.items():
        if spec.kind is None or torch.Tag.core in op.tags or op in decomposed:
            continue
        if op not in KEEP_WHOLE:
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
                    continue
            except RuntimeError:  # an overload the dispatcher does not know under this name
                continue
            if op._schema.is_mutable or any(r.alias_info is not None for r in op._schema.returns):
                continue
            if "out" in op._overloadname:
                continue
        rows.append({"op": str(op), "kind": spec.kind, "rule_class": _KIND_CLASSES.get(spec.kind, spec.kind)})
    for op in ATEN_DECOMPOSITIONS:
        rows.append({"op": str(op), "kind": "decomposed", "rule_class": "its core ops' rules"})
    for qualname in LIBRARY_IMPLEMENTATIONS:
        rows.append({"op": qualname.replace("::", "."), "kind": "decomposed", "rule_class": "its core ops' rules"})
    return sorted(rows, key=lambda r: r["op"])


def render_non_core_markdown() -> str:
    """A markdown section listing :func:`non_core_ops` (op, kind, rule class)."""
    lines = [
        "",
        "## Ops outside Core ATen",
        "",
        "Ops that torch's decomposition table leaves in a traced graph although they are not tagged core, with "
        "their op-table kind and rule class (`tests/test_op_sweep.py` finds them in single-op models), and the ops "
        "dynlrp decomposes itself (`dynlrp_fx/decompositions.py`). A `torch.library.custom_op` is traced through "
        "its Python implementation; any other op without a rule raises `DynlrpUnsupportedOpError` naming it and "
        "its module path.",
        "",
        "| op | kind | rule class |",
        "|---|---|---|",
    ]
    lines += [f"| `{r['op']}` | {r['kind']} | {r['rule_class']} |" for r in non_core_ops()]
    return "\n".join(lines) + "\n"
