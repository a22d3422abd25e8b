"""Look up an op: its op-table entry, the rule classes it can get and the rule a preset gives each.

>>> print(dynlrp.rules.describe_op("aten.bmm"))                                # doctest: +SKIP
>>> print(dynlrp.rules.describe_op(torch.ops.aten.relu.default, rules="lrp0"))  # doctest: +SKIP

``dynlrp info --op aten.bmm [--rules NAME]`` prints the same. :func:`describe_op` returns an
:class:`OpDescription` (``str()`` of it is the printed text); its fields hold the :class:`~.table.OpSpec` of each
overload, the rule classes :func:`~.table.classify` can give it, and per rule class the rule of the default preset
(``epsilon``) and of ``rules=``, with the preset's overrides that can apply to the op (``by_path``,
``first_layer``, ``by_module_type``, ``by_op``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import torch

from .base import Rule
from .table import FACTS, KINDS, OP_TABLE, OpSpec, classify

__all__ = ["describe_op", "resolve_op", "OpDescription", "OpEntry", "RuleClassInfo", "PresetRule"]

_OpOverload = torch._ops.OpOverload
_OpOverloadPacket = torch._ops.OpOverloadPacket


def resolve_op(op: Any) -> tuple[str, list]:
    """``op`` -> (its name, its overloads).

    ``op``: an ``OpOverload``, an ``OpOverloadPacket`` (all its overloads), or a name: ``"aten.bmm"`` (the packet),
    ``"aten.bmm.default"``, ``"torch.ops.aten.bmm"``, ``"aten::bmm"``; a name without a namespace (``"bmm"``,
    ``"bmm.default"``) means ``aten``.

    Raises
    ------
    ValueError: the name does not resolve to an op of this torch (custom ops must be defined, i.e. their library
        imported, first).
    TypeError: ``op`` is neither an op nor a string.
    """
    if isinstance(op, _OpOverload):
        return str(op), [op]
    if isinstance(op, _OpOverloadPacket):
        return str(op), [getattr(op, o) for o in op.overloads()]
    if not isinstance(op, str):
        raise TypeError(f"describe_op takes an OpOverload, an OpOverloadPacket or a name, not {type(op).__name__}")
    text = op.strip().replace("::", ".")
    text = text[len("torch.ops.") :] if text.startswith("torch.ops.") else text
    parts = text.split(".")
    if len(parts) == 1:
        parts = ["aten", *parts]
    if len(parts) > 3 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"unknown op {op!r}: expected a name like aten.bmm, aten.bmm.default or torch.ops.aten.bmm")
    ns, name, *overload = parts
    try:
        packet = getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, _OpOverloadPacket) and len(parts) == 2 and ns != "aten":
        try:  # "bmm.default": an aten overload
            return resolve_op(f"aten.{text}")
        except ValueError:
            pass
    if not isinstance(packet, _OpOverloadPacket):
        hint = "" if ns == "aten" else " (a custom op must be defined, e.g. its library imported, first)"
        raise ValueError(f"unknown op {op!r}: torch {torch.__version__} has no op {ns}.{name}{hint}")
    if not overload:
        return str(packet), [getattr(packet, o) for o in packet.overloads()]
    try:
        ov = getattr(packet, overload[0])
    except (AttributeError, RuntimeError):
        ov = None
    if not isinstance(ov, _OpOverload):
        raise ValueError(
            f"unknown op {op!r}: {ns}.{name} has no overload {overload[0]!r}; overloads: {', '.join(packet.overloads())}"
        )
    return str(ov), [ov]


@dataclass(frozen=True)
class PresetRule:
    """The rule a preset (composite) gives one rule class of an op.

    preset: the composite's name.
    rule: the class rule (``Composite.class_rules[rule_class]``).
    overrides: ``(where, rule)`` for the composite's choices that may apply to the op instead, in the order
        :meth:`~.composite.Composite.rule_for` tries them (the first that matches a node wins): ``by_path``
        globs, ``first_layer``, ``by_module_type``, ``by_op``. Only rules that fit the rule class are listed.
    """

    preset: str
    rule: Rule
    overrides: tuple[tuple[str, Rule], ...] = ()


@dataclass(frozen=True)
class RuleClassInfo:
    """A rule class an op can get, when it gets it, and the rule of each preset asked about (``rules[0]``: the
    default preset, ``epsilon``; ``rules[1]``: that of ``describe_op(rules=)``, when given)."""

    rule_class: str
    when: str
    rules: tuple[PresetRule, ...]


@dataclass(frozen=True)
class OpEntry:
    """Overloads of an op that share one op-table entry (``spec`` is ``None`` where they have none)."""

    overloads: tuple
    spec: OpSpec | None
    rule_classes: tuple[RuleClassInfo, ...]


@dataclass(frozen=True)
class OpDescription:
    """What :func:`describe_op` found; ``str()`` renders it as ``dynlrp info --op`` prints it."""

    name: str
    packet: bool  #: ``name`` is an ``OpOverloadPacket`` (``entries`` cover all its overloads)
    entries: tuple[OpEntry, ...]

    @property
    def rule_classes(self) -> tuple[str, ...]:
        """Every rule class any overload can get, in order of appearance."""
        return tuple(dict.fromkeys(c.rule_class for e in self.entries for c in e.rule_classes))

    def __str__(self) -> str:
        n = sum(len(e.overloads) for e in self.entries)
        lines = [f"{self.name} (OpOverloadPacket: {n} overload{'s' if n != 1 else ''})" if self.packet else self.name]
        grouped = self.packet or len(self.entries) > 1
        for e in self.entries:
            ind = "    " if grouped else "  "
            if grouped:
                lines += textwrap.wrap(
                    ", ".join(str(o) for o in e.overloads) + ":", _WIDTH, initial_indent="  ", subsequent_indent="  "
                )
            lines += [ind + s for s in _render_entry(e)]
        return "\n".join(lines)


_WIDTH = 112


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, _WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _arg_name(op: Any, i: int) -> str:
    args = op._schema.arguments
    return args[i].name if 0 <= i < len(args) else "?"


def _arg(op: Any, i: int) -> str:
    return f"{i}: {_arg_name(op, i)}"


def _render_entry(e: OpEntry) -> list[str]:
    op = e.overloads[0]
    packet = op._overloadpacket
    target = f"torch.ops.{packet}" if len(e.overloads) == len(packet.overloads()) > 1 else f"torch.ops.{op}"
    how = (
        f"add one: dynlrp.register_op({target}, KIND) with KIND one of {', '.join(KINDS)} "
        "(see dynlrp_fx/rules/table.py)"
    )
    s = e.spec
    if s is None:
        return [
            *_wrap(
                "no op-table entry: relevance reaching it is an unsupported op (compile raises "
                "DynlrpUnsupportedOpError, dynlrp coverage lists it as uncovered)"
            ),
            *_wrap(how),
        ]
    factors = "(" + ", ".join(_arg(op, i) for i in s.factors) + ")"
    slots = "every tensor operand" if s.slots is None else "(" + ", ".join(_arg(op, i) for i in s.slots) + ")"
    rel = f"op table: kind={s.kind}"
    if s.kind is None:
        rel += " (facts only)"
    elif s.kind == "multilinear":
        rel += f", factors={factors}, elementwise={s.elementwise}"
    elif s.factors:
        rel += f", factors={factors}"
    if s.kind is not None:
        rel += f", slots={slots}"
    facts = [f"bias={s.bias} ({_arg_name(op, s.bias)})" if s.bias is not None else "bias=None"]
    facts += [f"{k}={getattr(s, k)!r}" for k in FACTS if k != "bias"]
    out = [rel, *_wrap("facts: " + ", ".join(facts), "       ")]
    if s.kind is None:
        out += ["no relevance kind (facts only): relevance reaching it is an unsupported op"]
        return out + _wrap(how.replace("add one:", "give it a kind:"))
    out.append("rule classes (which one a node gets depends on which operands carry data):")
    overrides = False
    for c in e.rule_classes:
        out.append(f"  {c.rule_class}: {c.when}")
        for j, p in enumerate(c.rules):
            out.append(f"    {p.preset}{' (default)' if j == 0 else ''}: {p.rule!r}")
            out += [f"      {where}: {r!r}" for where, r in p.overrides]
            overrides = overrides or bool(p.overrides)
    if overrides:
        out.append("(indented under a preset: its overrides, tried in this order; the first that matches a node wins)")
    return out


def _cases(spec: OpSpec, op: Any) -> list[tuple[str, str]]:
    """(rule class, when) for each class :func:`classify` can give ``op`` (data slots as positions only)."""
    k, name = spec.kind, getattr(op, "_opname", "")
    if k == "route":
        cases = [("route", "always (values move, copy or select: R_k = J_k^T R)")]
        if name in ("index_put", "index_put_"):
            cases.append(("linear", "with accumulate=True (overlapping writes are summed)"))
        return cases
    if k == "affine":
        return [("linear", "always (a linear map of the data operands plus constants)")]
    if k == "multilinear":
        f = spec.factors
        cases = [
            (classify(spec, [(f[0],)]), "one factor carries data, the others are constants (e.g. a weight)"),
            (
                classify(spec, [(i,) for i in f]),
                "two or more factors carry data (e.g. "
                + ("a gate a * b)" if spec.elementwise else "attention's q @ k^T)"),
            ),
        ]
        if name == "mul":  # detect_normalizers marks mul and div only
            cases.append(
                (
                    classify(spec, [(i,) for i in f], {"normalizer_slot": (f[0],)}),
                    "a factor is a function of the other's statistics (RMSNorm) or elementwise (SiLU: a * g(a))",
                )
            )
        return cases
    if k == "unary":
        return [("identity", "always (an elementwise function of one data operand)")]
    if k == "div":
        cases = [
            (classify(spec, [(0,)]), "the divisor is a constant"),
            (classify(spec, [(0,), (1,)]), "the divisor carries data"),
        ]
        if name == "div":
            cases.append(
                (
                    classify(spec, [(0,), (1,)], {"normalizer_slot": (0,)}),
                    "the divisor is a function of the dividend's statistics (decomposed LayerNorm)",
                )
            )
        return cases
    if k == "none":
        return [("none", "always (declared to carry no relevance: relevance reaching it is absorbed)")]
    return [(classify(spec, []), "always")]


def _type_names(t: Any) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return ", ".join(getattr(x, "__name__", str(x)) for x in ts)


def _preset_rule(comp: Any, rule_class: str, kind: str, overloads: tuple) -> PresetRule:
    """The class rule of ``comp`` and its overrides that may apply (as in ``Composite.rule_for``)."""

    def fits(rule: Rule) -> bool:
        return rule_class in rule.classes

    ov: list[tuple[str, Rule]] = [(f"by_path {p!r}", r) for p, r in comp.by_path.items() if fits(r)]
    if kind == "multilinear" and comp.first_layer is not None and fits(comp.first_layer):
        inside = "" if comp.first_layer_types is None else f" inside {_type_names(tuple(comp.first_layer_types))}"
        ov.append((f"first_layer{inside}", comp.first_layer))
    by_type: dict[str, tuple[list, Rule]] = {}  # module types with the same rule on one line
    for t, r in comp.by_module_type.items():
        if fits(r):
            by_type.setdefault(repr(r), ([], r))[0].append(_type_names(t))
    ov += [(f"by_module_type {', '.join(ts)}", r) for ts, r in by_type.values()]
    for key, r in comp.by_op.items():
        if fits(r) and any(key is o or str(key) == str(o) for o in overloads):
            ov.append((f"by_op {key}", r))
    return PresetRule(comp.name, comp.class_rules[rule_class], tuple(ov))


def describe_op(op: Any, rules: Any = None) -> OpDescription:
    """Describe how dynlrp-fx explains ``op``: its op-table entry, rule classes and rules.

    Parameters
    ----------
    op: an ``OpOverload``, an ``OpOverloadPacket`` (all its overloads, grouped by shared entry) or a name such as
        ``"aten.bmm"``, ``"aten.bmm.default"`` or ``"torch.ops.aten.bmm"`` (see :func:`resolve_op`).
    rules: a preset name, a :class:`~.composite.Composite` or ``{rule class: Rule}`` (as ``compile(rules=)``):
        its rules are listed after those of the default preset (``epsilon``).

    Returns
    -------
    OpDescription: ``print()`` it for the text ``dynlrp info --op`` prints. An overload without an entry has
    ``spec=None`` and no rule classes (the text says how to add one with ``dynlrp.register_op``).

    Raises
    ------
    ValueError: an unknown op name or rules preset.
    """
    from ..presets import resolve  # presets imports this package

    name, overloads = resolve_op(op)
    comps = [resolve(None)]
    if rules is not None and not (isinstance(rules, str) and rules == "epsilon"):
        comps.append(resolve(rules))
    groups: dict[Any, list] = {}
    for o in overloads:
        groups.setdefault(OP_TABLE.get(o), []).append(o)
    entries = []
    for spec, ovs in groups.items():
        classes: list[RuleClassInfo] = []
        if spec is not None and spec.kind is not None:
            for rule_class, when in _cases(spec, ovs[0]):
                rs = tuple(_preset_rule(c, rule_class, spec.kind, tuple(ovs)) for c in comps)
                classes.append(RuleClassInfo(rule_class, when, rs))
        entries.append(OpEntry(tuple(ovs), spec, tuple(classes)))
    return OpDescription(name, name.count(".") == 1, tuple(entries))  # aten.bmm: a packet; aten.bmm.default: not
