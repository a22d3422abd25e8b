"""The persistent compile cache: a relevance program compiled once is read from disk by later processes.

:func:`dynlrp_fx.compile` spends most of its time tracing the model (``torch.export``) and running the passes. The
program it makes depends only on the model's *code and structure*, never on its weights (the program reads the
live parameters at every call). So the lowered program of each seed mode is stored on disk under a key computed
from what is cheap to read without tracing:

* the module tree: every submodule's class (with a digest of the source file that defines it and each of its base
  classes), its plain attributes (numbers, strings, flags, objects such as a Hugging Face config, walked field by
  field; small tensors that are not parameters or buffers by value), and the names, shapes, dtypes and devices of
  its parameters and buffers (tied parameters included);
* the example inputs' structure: dtypes, devices, ranks, and sizes, with the dimensions that are traced dynamic
  (batch; token sequence lengths) left out, and the values of non-tensor inputs;
* every compile option that changes the program: rules (each rule's class, source digest and settings), ``output=``,
  ``params=``, ``capture=``, ``dynamic``, memory policy, the seed mode, whether the backend is eager or compiled;
* the op table (rules registered with :func:`dynlrp_fx.register_op`), the digest of dynlrp-fx's own source and the
  versions of torch and Python.

What the cache therefore *trusts*: that a model's forward depends on nothing else, i.e. not on global state read
at run time (a module-level flag, code in another file of your project that the model's file imports and you
edited, a ``torch.library`` op whose implementation changed, a monkey-patch). If you change such a thing, clear the
cache (``dynlrp cache clear``) or pass ``cache=False``. A program read from the cache must still accept the
example inputs (their sizes are checked against its call spec) or it is compiled anew.

Storage (see :func:`cache_dir`): ``$DYNLRP_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynlrp-fx``, else
``~/.cache/dynlrp-fx``; ``DYNLRP_CACHE=0`` (or ``compile(..., cache=False)``) turns it off; ``DYNLRP_CACHE_SIZE_MB``
bounds it (default 1024; least recently used entries are removed beyond it). Each entry is one JSON file written to
a temporary name and renamed into place (atomic: two processes writing one entry leave one whole file), with a
SHA-256 of its body in its first line. Reading it runs no code: the graph is rebuilt node by node from ATen op
names (resolved in ``torch.ops``) and a short list of ``operator`` functions, node names must be identifiers, and
tensors are raw bytes of a known dtype. An entry that fails any check is removed and the program compiled again.
The Inductor cache (``backend="inductor"``) is put in the ``inductor`` folder beside the entries unless
``TORCHINDUCTOR_CACHE_DIR`` is set.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import hashlib
import json
import keyword
import math
import operator
import os
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["cache_dir", "enabled", "clear", "info", "Entry", "fingerprint", "model_data", "load", "store", "remove", "FORMAT_VERSION"]

#: bumped whenever the entry layout changes (old entries then simply miss)
FORMAT_VERSION = 1
_MAGIC = "dynlrp-fx-cache"
_DEFAULT_SIZE_MB = 1024


# -- where and whether ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The cache folder: ``$DYNLRP_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynlrp-fx``, else ``~/.cache/dynlrp-fx``."""
    env = os.environ.get("DYNLRP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dynlrp-fx"


def enabled(cache: bool | None = None) -> bool:
    """Whether a compile uses the cache: ``cache`` when given, else not ``DYNLRP_CACHE`` in (0, false, no, off)."""
    if cache is not None:
        if not isinstance(cache, bool):
            raise TypeError(f"cache= must be True, False or None, got {cache!r}")
        return cache
    return os.environ.get("DYNLRP_CACHE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def _size_bound() -> int:
    raw = os.environ.get("DYNLRP_CACHE_SIZE_MB", str(_DEFAULT_SIZE_MB))
    try:
        return max(0, int(float(raw) * 2**20))
    except ValueError:
        raise ValueError(f"DYNLRP_CACHE_SIZE_MB must be a number of megabytes, got {raw!r}") from None


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob("*.json")) if root.is_dir() else []


def info() -> dict[str, Any]:
    """The cache folder, its entries and their total size in bytes, and whether the cache is on."""
    root = cache_dir()
    files = _entries(root)
    return {"dir": str(root), "enabled": enabled(), "entries": len(files),
            "bytes": sum(f.stat().st_size for f in files if f.exists()), "bound_bytes": _size_bound()}


def clear() -> int:
    """Remove every cache entry (and the Inductor cache folder beside them); returns how many entries went."""
    root = cache_dir()
    files = _entries(root)
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    inductor = root / "inductor"
    if inductor.is_dir():
        import shutil

        shutil.rmtree(inductor, ignore_errors=True)
    return len(files)


def use_inductor_cache() -> None:
    """Point Inductor's own cache at ``<cache dir>/inductor`` unless the user chose a place for it."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


# -- the key -------------------------------------------------------------------------------------------------------
class Unkeyable(Exception):
    """A compile whose program the key cannot describe (it is then compiled without the cache)."""


@functools.cache
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    del mtime_ns, size  # part of the memo key only: an edited file is read again
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:24]


def _source_digest(mod_name: str) -> str:
    """Digest of the source file of a Python module (empty for torch's own, which torch's version covers)."""
    if mod_name == "torch" or mod_name.startswith("torch."):
        return ""
    mod = sys.modules.get(mod_name)
    path = getattr(mod, "__file__", None)
    if not path or not os.path.exists(path):
        return "nofile"
    st = os.stat(path)
    return _file_digest(path, st.st_mtime_ns, st.st_size)


def _code_digest(code: types.CodeType) -> str:
    """Digest of a code object: bytecode, names and constants (nested code objects included)."""
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        h.update(_code_digest(c).encode() if isinstance(c, types.CodeType) else repr(c).encode())
    return h.hexdigest()[:24]


@functools.lru_cache(maxsize=4096)
def _class_digest(cls: type) -> str:
    """A class by name and by the source of every class in its MRO (file digest, else its functions' code)."""
    parts = []
    for c in cls.__mro__:
        if c is object:
            continue
        digest = _source_digest(c.__module__)
        if digest == "nofile":  # a class made in a notebook cell or by exec: digest its methods' code
            digest = ",".join(
                f"{k}:{_code_digest(v.__code__)}" for k, v in sorted(vars(c).items()) if hasattr(v, "__code__"))
        parts.append(f"{c.__module__}.{c.__qualname__}@{digest}")
    return "|".join(parts)


_SKIP_ATTRS = frozenset({"_parameters", "_buffers", "_modules", "training"})


class _Encoder:
    """Turns the objects that determine a program into plain JSON data (deterministic: no ids, no addresses)."""

    MAX_DEPTH = 16  #: deeper object graphs are not described (the compile is then not cached)
    MAX_ITEMS = 200_000  #: nor are larger ones (a module holding a dataset, say)
    SMALL_TENSOR = 4096  #: tensor attributes (not parameters/buffers) up to this many elements are keyed by value

    def __init__(self) -> None:
        self._active: set[int] = set()
        self._items = 0

    def __call__(self, obj: Any, depth: int = 0) -> Any:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else repr(obj)
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return f"{type(obj).__name__}:{obj}"
        if isinstance(obj, enum.Enum):
            return ["enum", _class_digest(type(obj)), obj.name]
        if isinstance(obj, torch.Tensor):
            spec = ["tensor", str(obj.dtype), list(obj.shape), obj.device.type]
            if obj.numel() <= self.SMALL_TENSOR and not isinstance(obj, nn.Parameter):
                spec.append(hashlib.sha256(_raw_bytes(obj)).hexdigest()[:24])
            return spec
        if isinstance(obj, type):
            return ["class", _class_digest(obj)] if not _is_dim(obj) else ["dim", obj.__name__,
                                                                           getattr(obj, "min", None),
                                                                           getattr(obj, "max", None)]
        if isinstance(obj, nn.Module):  # modules are walked by the tree; a reference elsewhere is its class
            return ["module", _class_digest(type(obj))]
        self._items += 1
        if depth > self.MAX_DEPTH or self._items > self.MAX_ITEMS:
            raise Unkeyable(f"a {type(obj).__qualname__} is nested too deep in the model or options to be described")
        if id(obj) in self._active:
            return ["cycle", type(obj).__qualname__]
        self._active.add(id(obj))
        try:
            return self._container(obj, depth + 1)
        finally:
            self._active.discard(id(obj))

    def _container(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, (list, tuple)):
            return [type(obj).__name__, [self(x, depth) for x in obj]]
        if isinstance(obj, dict):
            items = [[self(k, depth), self(v, depth)] for k, v in obj.items()]
            return ["dict", sorted(items, key=lambda kv: json.dumps(kv[0], sort_keys=True))]
        if isinstance(obj, (set, frozenset)):
            return ["set", sorted(json.dumps(self(x, depth), sort_keys=True) for x in obj)]
        if isinstance(obj, functools.partial):
            return ["partial", self(obj.func, depth), self(obj.args, depth), self(obj.keywords, depth)]
        if isinstance(obj, (types.FunctionType, types.MethodType)):
            fn = obj.__func__ if isinstance(obj, types.MethodType) else obj
            cells = [self(c.cell_contents, depth) for c in (fn.__closure__ or ()) if _cell_filled(c)]
            return ["fn", fn.__module__, fn.__qualname__, _code_digest(fn.__code__), self(fn.__defaults__, depth),
                    cells, self(obj.__self__, depth) if isinstance(obj, types.MethodType) else None]
        if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ["op", str(obj)]
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)) or callable(obj) and hasattr(
                obj, "__qualname__") and not hasattr(obj, "__dict__"):
            return ["builtin", getattr(obj, "__module__", None), getattr(obj, "__qualname__", repr(obj))]
        state = _plain_vars(obj)
        if state is not None:
            # an int field named like a hash is an object's identity, not its configuration, and Python's string
            # hashes differ between processes (transformers' GenerationConfig keeps `_original_object_hash`)
            state = {k: v for k, v in state.items()
                     if not (isinstance(k, str) and "hash" in k.lower() and isinstance(v, int))}
            return ["obj", _class_digest(type(obj)), self(state, depth)]
        text = repr(obj)
        if " at 0x" in text:  # an address: the object cannot be described, so no two compiles may share it
            raise Unkeyable(f"cannot describe {type(obj).__qualname__} for the compile cache")
        return ["repr", type(obj).__qualname__, text]


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def _is_dim(obj: type) -> bool:
    """A ``torch.export.Dim`` (a class with a name and bounds)."""
    return type(obj).__name__ in ("_Dim", "_DerivedDim", "_StaticDim")


def _plain_vars(obj: Any) -> dict | None:
    """The attributes of an ordinary object (``__dict__`` and ``__slots__``), ``None`` when it has none."""
    out = {}
    if hasattr(obj, "__dict__"):
        out.update(vars(obj))
    for cls in type(obj).__mro__:
        for s in getattr(cls, "__slots__", ()):
            if isinstance(s, str) and s not in ("__dict__", "__weakref__") and hasattr(obj, s):
                out[s] = getattr(obj, s)
    return out if out or hasattr(obj, "__dict__") else None


def _module_tree(model: nn.Module, enc: _Encoder) -> list:
    """Every submodule: path, class digest, plain attributes; then parameters and buffers with ties."""
    modules = []
    for path, mod in model.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(mod).items() if k not in _SKIP_ATTRS}
        modules.append([path, _class_digest(type(mod)), enc(attrs)])
    first_name: dict[int, str] = {}
    state = []
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            tied = first_name.setdefault(id(t), name)
            state.append([kind, name, str(t.dtype), list(t.shape), str(t.device), t.requires_grad,
                          tied if tied != name else None])
    return [modules, state]


def _leaf_spec(x: Any, dims: dict[int, str]) -> Any:
    """An example input leaf: tensors by dtype/device/sizes with the dynamic dimensions named, others by value."""
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype), str(x.device), [dims.get(d, s) for d, s in enumerate(x.shape)]]
    return _Encoder()(x)


def input_spec(args: tuple, kwargs: dict, dynamic_dims: dict[int, dict[int, str]]) -> list:
    """The example inputs as key data; ``dynamic_dims`` maps a tensor leaf's flat index to {dim: name} of the
    dimensions that are keyed by their role only (their size is checked against the stored program instead)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    return [str(spec), [_leaf_spec(x, dynamic_dims.get(i, {})) for i, x in enumerate(flat)]]


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    """Digest of dynlrp-fx's own source: a program made by other compiler code is never reused."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:24]


def _op_table_digest() -> str:
    """Digest of the op table (``register_op`` changes which rule class an op gets, hence the program)."""
    from .rules.table import OP_TABLE

    h = hashlib.sha256()
    for op, spec in OP_TABLE.items():
        h.update(f"{op}={spec!r};".encode())
    return h.hexdigest()[:24]


def model_data(model: nn.Module) -> str:
    """The model part of a cache key (module tree, attributes, parameter and buffer specs) as JSON text."""
    return json.dumps(_module_tree(model, _Encoder()), sort_keys=True, separators=(",", ":"))


def fingerprint(model: str, inputs: list, options: dict[str, Any]) -> str:
    """The cache key of a compile: a hex digest of the model (:func:`model_data`), the input spec (see
    :func:`input_spec`), options and environment (see the module doc). Raises :class:`Unkeyable` when something
    cannot be described."""
    data = {
        "format": FORMAT_VERSION,
        "package": _package_digest(),
        "torch": torch.__version__,
        "python": list(sys.version_info[:2]),
        "default_dtype": str(torch.get_default_dtype()),
        "op_table": _op_table_digest(),
        "model": hashlib.sha256(model.encode()).hexdigest(),
        "inputs": inputs,
        "options": _Encoder()(options),
    }
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- graphs as data ------------------------------------------------------------------------------------------------
#: the Python functions (besides ``torch.ops`` overloads) a stored program may call
_OPERATORS = {f"operator.{name}": getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "not_")}
_OPERATOR_NAMES = {v: k for k, v in _OPERATORS.items()}
for _name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite"):
    if hasattr(torch, _name):
        _OPERATORS[f"torch.{_name}"] = getattr(torch, _name)
        _OPERATOR_NAMES[getattr(torch, _name)] = f"torch.{_name}"

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}
_LAYOUTS = {str(x).removeprefix("torch."): x for x in (torch.strided, torch.sparse_coo)}
_FORMATS = {str(x).removeprefix("torch."): x for x in (
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}


class CorruptEntry(Exception):
    """A cache entry that fails a check (it is removed and the program compiled again)."""


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"op:{target._schema.name}.{target._overloadname}"
    name = _OPERATOR_NAMES.get(target)
    if name is None:
        raise Unkeyable(f"the program calls {target!r}, which a cache entry cannot store")
    return name


def _resolve_target(name: Any) -> Any:
    if not isinstance(name, str):
        raise CorruptEntry(f"bad call target {name!r}")
    if name.startswith("op:"):
        qual, _, overload = name[3:].rpartition(".")
        ns, _, op = qual.partition("::")
        if not (ns.isidentifier() and op.isidentifier() and overload.isidentifier()):
            raise CorruptEntry(f"bad op name {name!r}")
        try:
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError) as e:
            raise CorruptEntry(f"unknown op {name!r}") from e
    if name in _OPERATORS:
        return _OPERATORS[name]
    raise CorruptEntry(f"call target {name!r} is not allowed")


def _enc_arg(a: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(a, fx.Node):
        return {"n": index[a]}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"f": repr(a)}
    if isinstance(a, (list, tuple)):
        return {"l" if isinstance(a, list) else "t": [_enc_arg(x, index) for x in a]}
    if isinstance(a, dict):
        return {"d": [[k, _enc_arg(v, index)] for k, v in a.items()]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"format": str(a).removeprefix("torch.")}
    raise Unkeyable(f"a program argument of type {type(a).__name__} cannot be stored")


def _dec_arg(a: Any, nodes: list[fx.Node]) -> Any:
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, dict) and len(a) == 1:
        (tag, v), = a.items()
        if tag == "n" and isinstance(v, int) and 0 <= v < len(nodes):
            return nodes[v]
        if tag in ("l", "t") and isinstance(v, list):
            items = [_dec_arg(x, nodes) for x in v]
            return items if tag == "l" else tuple(items)
        if tag == "d" and isinstance(v, list):
            return {_str(k): _dec_arg(x, nodes) for k, x in v}
        if tag == "f" and v in ("inf", "-inf", "nan"):
            return float(v)
        for table, t in ((_DTYPES, "dtype"), (_LAYOUTS, "layout"), (_FORMATS, "format")):
            if tag == t and v in table:
                return table[v]
        if tag == "device" and isinstance(v, str):
            try:
                return torch.device(v)
            except RuntimeError as e:
                raise CorruptEntry(f"bad device {v!r}") from e
    raise CorruptEntry(f"bad program argument {a!r:.80}")


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise CorruptEntry(f"expected a string, got {x!r:.80}")
    return x


def graph_to_data(gm: fx.GraphModule) -> dict:
    """A lowered program as JSON data: placeholders, calls (target name, args, kwargs), output. Tensor attributes
    (``get_attr``, e.g. a constant that rule code made while traced) are stored as raw bytes."""
    index: dict[fx.Node, int] = {}
    nodes, attrs = [], {}
    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        if n.op == "placeholder":
            nodes.append(["placeholder", n.name])
        elif n.op == "call_function":
            nodes.append(["call", n.name, _target_name(n.target), _enc_arg(n.args, index), _enc_arg(n.kwargs, index)])
        elif n.op == "get_attr":
            value = getattr(gm, n.target)
            if not isinstance(value, torch.Tensor):
                raise Unkeyable(f"the program reads a {type(value).__name__} attribute")
            attrs[n.target] = tensor_to_data(value)
            nodes.append(["attr", n.name, n.target])
        elif n.op == "output":
            nodes.append(["output", n.name, _enc_arg(n.args[0], index)])
        else:
            raise Unkeyable(f"the program has a {n.op} node")
    return {"nodes": nodes, "attrs": attrs}


def _identifier(name: Any) -> str:
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        raise CorruptEntry(f"bad node name {name!r:.80}")
    return name


def graph_from_data(data: Any) -> fx.GraphModule:
    """Rebuild a program stored by :func:`graph_to_data` (every name, target and argument checked)."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CorruptEntry("no graph")
    root = nn.Module()
    for name, t in (data.get("attrs") or {}).items():
        root.register_buffer(_identifier(name), tensor_from_data(t))
    g = fx.Graph()
    nodes: list[fx.Node] = []
    done = False
    for item in data["nodes"]:
        if done or not isinstance(item, list) or not item:
            raise CorruptEntry("bad graph node")
        kind = item[0]
        if kind == "placeholder" and len(item) == 2:
            n = g.placeholder(_identifier(item[1]))
        elif kind == "call" and len(item) == 5:
            args, kwargs = _dec_arg(item[3], nodes), _dec_arg(item[4], nodes)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise CorruptEntry("bad call arguments")
            n = g.create_node("call_function", _resolve_target(item[2]), args, kwargs, name=_identifier(item[1]))
        elif kind == "attr" and len(item) == 3:
            if not hasattr(root, _identifier(item[2])):
                raise CorruptEntry(f"unknown attribute {item[2]!r}")
            n = g.get_attr(item[2])
        elif kind == "output" and len(item) == 3:
            n = g.output(_dec_arg(item[2], nodes))
            done = True
        else:
            raise CorruptEntry(f"bad graph node kind {kind!r:.40}")
        if kind != "output" and n.name != item[1]:
            raise CorruptEntry(f"duplicate node name {item[1]!r}")
        nodes.append(n)
    if not done:
        raise CorruptEntry("graph without output")
    return fx.GraphModule(root, g)


def _raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's elements in row-major order (any dtype, 0-d included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_to_data(t: torch.Tensor) -> dict:
    if type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer if hasattr(nn, "Buffer") else torch.Tensor):
        raise Unkeyable(f"a {type(t).__name__} cannot be stored")
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise Unkeyable(f"a {t.dtype} tensor cannot be stored")
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(_raw_bytes(t)).decode("ascii")}


def tensor_from_data(d: Any) -> torch.Tensor:
    if not isinstance(d, dict) or d.get("dtype") not in _DTYPES or not isinstance(d.get("data"), str):
        raise CorruptEntry("bad tensor")
    shape = d.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CorruptEntry("bad tensor shape")
    dtype = _DTYPES[d["dtype"]]
    try:
        raw = base64.b64decode(d["data"], validate=True)
    except ValueError as e:
        raise CorruptEntry("bad tensor data") from e
    n = math.prod(shape)
    if len(raw) != n * dtype.itemsize:
        raise CorruptEntry("tensor data does not match its shape")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


# -- call specs as data ---------------------------------------------------------------------------------------------
def call_spec_to_data(spec: Any) -> dict:
    """A :class:`~dynlrp_fx.runtime.CallSpec` as JSON data (non-tensor input values must be JSON values)."""
    data = {f: getattr(spec, f) for f in ("const_leaves", "tensor_leaf_index", "output_name", "output_shape",
                                           "max_batch", "static_batch", "hint", "output_names", "output_shapes",
                                           "output_batched")}
    data["in_spec"] = pytree.treespec_dumps(spec.in_spec)
    data["const_leaves"] = [[i, v] for i, v in spec.const_leaves.items()]
    data["inputs"] = [[s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.batched] for s in spec.inputs]
    data["ranges"] = [[k, list(v)] for k, v in spec.ranges.items()]
    try:
        json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise Unkeyable(f"the call spec cannot be stored ({e})") from None
    return data


def call_spec_from_data(data: dict) -> Any:
    """The inverse of :func:`call_spec_to_data`."""
    from .runtime import CallSpec, InputSpec

    try:
        inputs = [InputSpec(_str(n), _DTYPES[d], list(shape), bool(b)) for n, d, shape, b in data["inputs"]]
        return CallSpec(
            pytree.treespec_loads(_str(data["in_spec"])), {int(i): v for i, v in data["const_leaves"]},
            [int(i) for i in data["tensor_leaf_index"]], inputs, _str(data["output_name"]), data["output_shape"],
            data["max_batch"], data["static_batch"], None, _str(data["hint"]),
            ranges={_str(k): (v[0], v[1]) for k, v in data["ranges"]}, output_names=list(data["output_names"]),
            output_shapes=list(data["output_shapes"]), output_batched=bool(data["output_batched"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptEntry(f"bad call spec ({e})") from e


# -- entries -------------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """What a compile needs to run one seed mode's program without tracing the model.

    ``call_spec`` is :class:`~dynlrp_fx.runtime.CallSpec` as data; ``state`` lists ``[kind, target, dtype, shape]``
    of the program's state inputs in order (``kind`` PARAMETER/BUFFER read from the live model, CONSTANT_TENSOR
    read from the model when it has a tensor at ``target``, else from ``constants``); ``graph`` the program (the
    eager backend's buffer-reusing copy, or the functional graph for compiled backends); ``outputs`` the
    :class:`~dynlrp_fx.passes.pair.ProgramOutputs` fields; ``prefix`` what the traced root added to state names
    (``"model."`` for an ``output=`` callable); ``specialised`` the dimensions the model specialised.
    """

    call_spec: dict
    state: list
    graph: dict
    outputs: dict
    constants: dict = field(default_factory=dict)
    prefix: str = ""
    specialised: dict = field(default_factory=dict)
    #: set by :func:`load`, which checks every part before an entry is used: the rebuilt program, call spec,
    #: constant tensors and state plan (``(kind, target, (dtype, shape) or None)`` per state input)
    program: Any = field(default=None, repr=False, compare=False)
    spec: Any = field(default=None, repr=False, compare=False)
    tensors: dict = field(default_factory=dict, repr=False, compare=False)
    state_plan: list = field(default_factory=list, repr=False, compare=False)

    def data(self) -> dict:
        """The stored fields (what :func:`store` writes)."""
        return {k: getattr(self, k) for k in _DATA_FIELDS}


_DATA_FIELDS = ("call_spec", "state", "graph", "outputs", "constants", "prefix", "specialised")


def _decode(entry: Entry) -> None:
    """Check and rebuild every part of an entry (raises :class:`CorruptEntry`, ``ValueError``...)."""
    entry.program = graph_from_data(entry.graph)
    entry.spec = call_spec_from_data(entry.call_spec)
    if not isinstance(entry.constants, dict) or not isinstance(entry.state, list):
        raise CorruptEntry("bad state")
    entry.tensors = {_str(k): tensor_from_data(v) for k, v in entry.constants.items()}
    entry.state_plan = []
    for item in entry.state:
        kind, target, dtype, shape = item
        if kind not in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") or not isinstance(target, str):
            raise CorruptEntry("bad state input")
        if kind == "CONSTANT_TENSOR" and target not in entry.tensors:
            raise CorruptEntry(f"constant {target!r} missing")
        if dtype is not None and (dtype not in _DTYPES or not all(isinstance(d, int) for d in shape)):
            raise CorruptEntry("bad state spec")
        entry.state_plan.append((kind, target, (_DTYPES[dtype], tuple(shape)) if dtype is not None else None))
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in entry.outputs.values()):
        raise CorruptEntry("bad output names")


def _path(key: str, mode: str) -> Path:
    return cache_dir() / f"{key[:40]}-{mode}.json"


def load(key: str, mode: str) -> Entry | None:
    """The entry of ``(key, mode)``, or ``None``; a corrupted entry is removed (with a warning) and misses."""
    path = _path(key, mode)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    try:
        head, _, body = raw.partition(b"\n")
        header = json.loads(head)
        if not isinstance(header, dict) or header.get("magic") != _MAGIC:
            raise CorruptEntry("not a dynlrp-fx cache entry")
        if header.get("format") != FORMAT_VERSION or header.get("key") != key or header.get("mode") != mode:
            raise CorruptEntry("entry of another key or format")
        if hashlib.sha256(body).hexdigest() != header.get("sha256"):
            raise CorruptEntry("checksum mismatch")
        data = json.loads(body)
        entry = Entry(**{k: data[k] for k in _DATA_FIELDS})
        _decode(entry)
    except (CorruptEntry, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        warnings.warn(f"dynlrp: compile cache entry {path} is corrupted ({e}); it is removed and the program "
                      "compiled again", stacklevel=4)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # least recently *used* entries go first when the cache is over its bound
    return entry


def store(key: str, mode: str, entry: Entry) -> Path | None:
    """Write an entry atomically (temporary file + rename), then keep the cache within its size bound. A cache
    that cannot be written (read-only disk, no space) only warns: the compile itself succeeded."""
    body = json.dumps(entry.data(), separators=(",", ":"), allow_nan=False).encode()
    header = {"magic": _MAGIC, "format": FORMAT_VERSION, "key": key, "mode": mode,
              "sha256": hashlib.sha256(body).hexdigest()}
    path = _path(key, mode)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n" + body)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _evict(path.parent, keep=path)
    except OSError as e:
        warnings.warn(f"dynlrp: could not write the compile cache entry {path} ({e})", stacklevel=4)
        return None
    return path


def remove(key: str) -> None:
    """Remove every entry of a key (all seed modes)."""
    for f in _entries(cache_dir()):
        if f.name.startswith(key[:40] + "-"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used entries until the cache fits its bound (never the one just written)."""
    bound = _size_bound()
    stats = []
    for f in _entries(root):
        with contextlib.suppress(FileNotFoundError):
            st = f.stat()
            stats.append((st.st_mtime, st.st_size, f))
    total = sum(s for _, s, _ in stats)
    for _, size, f in sorted(stats, key=lambda s: s[0]):
        if total <= bound:
            break
        if f == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
        total -= size
