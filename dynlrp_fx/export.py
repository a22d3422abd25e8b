"""Ahead-of-time export: an explainer's relevance program as a ``.pt2`` file that runs without the model's code.

>>> dynlrp.export(explainer, "resnet18.pt2")                     # doctest: +SKIP
>>> f = dynlrp.load("resnet18.pt2")                               # no torchvision needed  # doctest: +SKIP
>>> f(x, target=3).relevance                                      # doctest: +SKIP

The file is a PT2 archive (``torch.export.pt2_archive``) holding, per seed mode (``"target"`` as the archive's
default model ``"model"``, ``"seed"`` as ``"seed"``), the *lowered* forward+relevance graph (pure ATen) with the
model's parameters and buffers inside it, and ``extra/dynlrp.json`` with the metadata :func:`load` checks
(dynlrp-fx and torch versions, rules, input and output specification). ``package="exported"`` stores
``torch.export`` programs (``torch.export.load(path)`` returns the target-mode program); ``package="aoti"``
stores AOTInductor-compiled kernels (``torch._inductor.aoti_load_package(path)`` loads the target mode; a C++
runtime can load it with ``AOTIModelPackageLoader``). The batch dimension and any other dimension that was
dynamic at compile time stay dynamic.

:func:`load` treats the file as untrusted: it checks the archive before torch reads it and never unpickles anything
but plain tensors (see ``_check_archive``); ``package="aoti"`` files are native code and are trusted by design.

Graph calling convention (both modes): ``(*input tensors, target_or_seed) -> (output, seed_total (B,),
absorbed (B,), *input relevances, *parameter relevances, *captured relevances)`` (the last two only with
``compile(params=..., capture=...)``); the target is ``(B,)`` int64 with ``-1`` = argmax. With ``K`` explained
outputs (``compile(output=[...])``) the graph returns all ``K`` in front of ``seed_total``, the target is ``(B, K)``
and the seed ``(B, n_1 + ... + n_K)`` (the metadata's ``outputs`` and ``relevance_outputs[mode]["output_names"]``
list them). For an output without a batch dimension (``output_batched`` false) ``B`` is 1: the call is one sample.

Tested with torch 2.14 only. The archive API (``package_pt2``/``load_pt2``) is looked up in
``torch.export.pt2_archive`` and ``torch._inductor.package``; on a torch that has neither, :func:`export` and
:func:`load` raise a :class:`DynlrpError` naming the torch version.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import io
import json
import math
import operator
import os
import re
import tempfile
import zipfile
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import DynlrpError, DynlrpInputError, DynlrpLoadError, DynlrpShapeError
from .explainer import Explainer
from .passes.pair import ProgramOutputs
from .runtime import CallPath, CallSpec, Explanation, dim_spec, explain_first_that_fits, is_symbol

__all__ = ["export", "load", "LoadedExplainer", "FORMAT_VERSION", "PACKAGES"]

#: version of the dynlrp metadata layout (bumped on incompatible changes; :func:`load` refuses newer files)
#: 2: several explained outputs and outputs without a batch dimension (``outputs``, ``output_batched``)
FORMAT_VERSION = 2
PACKAGES = ("exported", "aoti")
MODES = ("target", "seed")
_META_NAME = "dynlrp.json"
_MODEL_NAMES = {"target": "model", "seed": "seed"}  # "model" = torch's default, so torch.export.load works


class DynlrpLoadedInputError(DynlrpLoadError, DynlrpInputError):
    """A loaded explainer was called with inputs that do not match the exported program (wrong rank, dtype,
    shape or structure). Both a :class:`DynlrpLoadError` and a :class:`DynlrpInputError`."""


# -- archive API (moved between torch releases) -------------------------------------------------------------------
def _archive_api():
    """``(package_pt2, load_pt2)`` of this torch, or a :class:`DynlrpError` naming the torch version."""
    for mod in ("torch.export.pt2_archive._package", "torch._inductor.package.package"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "package_pt2") and hasattr(m, "load_pt2"):
            return m.package_pt2, m.load_pt2
    raise DynlrpError(
        f"torch {torch.__version__} has no PT2 archive API (package_pt2/load_pt2); dynlrp.export and dynlrp.load "
        "need a torch release that provides torch.export.pt2_archive. Upgrade torch."
    )


def _version_tuple(v: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# -- specs ----------------------------------------------------------------------------------------------------------
def _tensor_spec(val: torch.Tensor) -> dict[str, Any]:
    return {"dtype": str(val.dtype).removeprefix("torch."), "shape": [dim_spec(s) for s in val.shape]}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise DynlrpLoadError(f"the file names dtype {name!r}, which this torch {torch.__version__} does not know")
    return dt


def _json_leaf(i: int, v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise DynlrpError(
        f"non-tensor input #{i} is {v!r} ({type(v).__name__}); only None, bool, int, float and str inputs can be "
        "stored in an exported file. Compile the explainer with tensors or simple values as inputs."
    )


class _Frozen(nn.Module):
    """The lowered graph with the model's state tensors as buffers: ``forward(*inputs, extra)``."""

    def __init__(self, graph: torch.fx.GraphModule, state: list[torch.Tensor]):
        super().__init__()
        self.graph = graph
        self._slots: list[str] = []
        seen: dict[int, str] = {}
        for t in state:
            key = id(t)
            if key not in seen:  # tied weights stay one buffer
                seen[key] = f"state_{len(seen)}"
                # stored contiguous: torch's archive writer saves a non-contiguous tensor (channels_last weights)
                # as its whole storage with a warning; the lowered graph runs on any strides (``passes/lower.py``)
                self.register_buffer(seen[key], t.detach().contiguous())
            self._slots.append(seen[key])

    def forward(self, *inputs: torch.Tensor):
        return self.graph(*(getattr(self, s) for s in self._slots), *inputs)


def _sym_dim(s: torch.SymInt, name: str) -> Any:
    """A named ``Dim`` with the symbol's value range (lower bounds 2 from 0/1 specialisation become 1)."""
    lo, hi = 1, None
    try:
        rng = s.node.shape_env.var_to_range.get(s.node.expr)
        if rng is not None:
            lo = max(1, int(rng.lower)) if int(rng.lower) > 2 else 1
            hi = int(rng.upper) if rng.upper.is_finite else None
    except (AttributeError, TypeError, ValueError, OverflowError):
        pass
    return (
        torch.export.Dim(f"dyn_{name}", min=lo, max=hi) if hi is not None else torch.export.Dim(f"dyn_{name}", min=lo)
    )


def _dynamic_shapes(vals: list[torch.Tensor], auto: bool = False) -> tuple:
    """``torch.export`` dynamic shapes for the placeholders' fake values: one ``Dim`` per batch/dynamic symbol
    (``auto``: ``Dim.AUTO`` everywhere, letting export infer the relations)."""
    dims: dict[str, Any] = {}
    out = []
    for v in vals:
        spec = {}
        for d, s in enumerate(v.shape):
            if not isinstance(s, torch.SymInt):
                continue
            name = str(s.node.expr)
            if not auto and is_symbol(name):
                if name not in dims:
                    dims[name] = _sym_dim(s, name)
                spec[d] = dims[name]
            else:  # a derived size (e.g. 2*s0): let export infer it
                spec[d] = torch.export.Dim.AUTO
        out.append(spec or None)
    return (tuple(out),)


def _export_mode(explainer: Explainer, mode: str, state: list[torch.Tensor], inputs: list[torch.Tensor]):
    """``(ExportedProgram, metadata of the extra input)`` for one seed mode."""
    graph = explainer.graph(mode)
    ph = [n for n in graph.graph.nodes if n.op == "placeholder"]
    n_state = len(state)
    vals = [n.meta["val"] for n in ph[n_state:]]
    call = explainer._call
    device = inputs[0].device if inputs else None
    extra = call.target_tensor(None, call.batch_size(inputs), device)  # the target: argmax of every output
    if mode == "seed":  # ones for every explained output, packed as the call path packs seeds
        with torch.no_grad():
            ys = explainer.graph("target")(*state, *inputs, extra)[: len(call.spec.explained)]
        ones = [torch.ones_like(y) for y in ys]
        extra = call.seed_tensor(ones[0] if len(ones) == 1 else tuple(ones), inputs)
    frozen = _Frozen(graph, state)
    try:
        try:
            ep = torch.export.export(frozen, (*inputs, extra), dynamic_shapes=_dynamic_shapes(vals), strict=False)
        except Exception:  # noqa: BLE001 - retry letting export infer the ranges and relations
            ep = torch.export.export(frozen, (*inputs, extra), dynamic_shapes=_dynamic_shapes(vals, True), strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise DynlrpError(
            f"torch.export could not re-export the lowered {mode!r} relevance graph: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\nCompile the explainer with batch >= 2 "
            "example inputs, or with dynamic=False for a static-shape file."
        ) from e
    return ep, _tensor_spec(vals[-1])


def _metadata(explainer: Explainer, package: str, modes: tuple[str, ...], extras: dict[str, dict]) -> dict:
    from . import __version__

    traced = explainer.traced
    graph = explainer.graph("target")
    ph = [n for n in graph.graph.nodes if n.op == "placeholder"][len(traced.state_specs) :]
    inputs = []
    for ui, node in zip(traced.user_inputs, ph):
        inputs.append({"name": ui.name, "batched": ui.batched, **_tensor_spec(node.meta["val"])})
    y_val = explainer.analysis.output_node.meta.get("val")
    return {
        "format": "dynlrp-fx",
        "format_version": FORMAT_VERSION,
        "dynlrp_version": __version__,
        "torch_version": torch.__version__,
        "package": package,
        "modes": list(modes),
        "rules": explainer.composite.name,
        "in_spec": pytree.treespec_dumps(traced.in_spec),
        "const_leaves": {str(i): _json_leaf(i, v) for i, v in traced.const_leaves.items()},
        "tensor_leaf_index": list(traced.tensor_leaf_index),
        "max_batch": traced.max_batch,
        "inputs": inputs,
        "ranges": {k: list(v) for k, v in explainer.call_spec.ranges.items()},
        "output": {"name": traced.output_name, **(_tensor_spec(y_val) if y_val is not None else {})},
        "outputs": [{"name": n, "shape": sh} for n, sh in explainer.call_spec.explained],
        "output_batched": explainer.call_spec.output_batched,
        "relevance_outputs": {m: _output_names(explainer, m) for m in modes},
        "extra_inputs": extras,
        "rule_table": explainer.rule_table(),
    }


#: the per-program output-name lists (:class:`~dynlrp_fx.passes.pair.ProgramOutputs`) the call path splits outputs by
_NAME_FIELDS = ("input_names", "param_names", "capture_names", "output_names")


def _output_names(explainer: Explainer, mode: str) -> dict[str, list[str]]:
    outputs = explainer.program(mode).outputs
    return {f: list(getattr(outputs, f)) for f in _NAME_FIELDS}


#: metadata fields that differ between an explainer and the explainers it built for other input shapes
_VARIANT_FIELDS = ("in_spec", "const_leaves", "tensor_leaf_index", "max_batch", "inputs", "ranges", "output", "outputs",
                   "output_batched", "relevance_outputs", "extra_inputs")


def _model_name(mode: str, variant: int) -> str:
    """The archive's model name of a seed mode's program: torch's default ``"model"`` for the target mode of the
    explainer itself (so that ``torch.export.load`` works), ``shape<k>_<mode>`` for its k-th input-shape variant."""
    return _MODEL_NAMES[mode] if variant == 0 else f"shape{variant}_{mode}"


def export(
    explainer: Explainer,
    path: str | os.PathLike,
    *,
    package: str = "exported",
    modes: tuple[str, ...] = MODES,
    inductor_configs: dict[str, Any] | None = None,
) -> str:
    """Save ``explainer``'s forward+relevance program as a self-contained ``.pt2`` file.

    Parameters
    ----------
    explainer: a compiled :class:`~dynlrp_fx.Explainer` (any backend; the lowered ATen graph is exported).
    path: the file to write (``.pt2``).
    package: ``"exported"`` (``torch.export`` programs; portable, interpreted by torch) or ``"aoti"``
        (AOTInductor-compiled kernels; needs a C++ compiler at export time, runs without Python model code and
        without compilation at load time).
    modes: which seed modes to store: ``"target"`` (``target=`` calls) and/or ``"seed"`` (``seed=`` calls).
        Both by default; AOTInductor compiles each one, so ``modes=("target",)`` halves its export time.
        The programs the explainer built for other input shapes (:attr:`Explainer.variants`: the model specialised
        a size, or the program is static in it) are stored too, each with its own copy of the weights, and the
        loaded explainer picks the one that takes a call's inputs.
    inductor_configs: extra ``torch._inductor.config`` options for ``package="aoti"``.

    Returns
    -------
    The path written.

    Raises
    ------
    DynlrpError: ``explainer`` is not a compiled explainer (e.g. a :class:`LoadedExplainer` or a plain model), the
        graph could not be re-exported, or the explainer has non-tensor inputs that cannot be stored.
    """
    if not isinstance(explainer, Explainer):
        raise _not_an_explainer(explainer)
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes!r}")
    package_pt2, _ = _archive_api()
    path = os.fspath(path)
    programs, meta = {}, None
    # the explainer's own programs, then those it built for other input shapes (Explainer.variants), each under
    # its own model names and with its own input specification in the metadata
    for k, ex in enumerate([explainer, *explainer.variants]):
        traced = ex.traced
        inputs = [traced.example_flat[i].detach() for i in traced.tensor_leaf_index]
        state = ex.state_tensors(inputs[0].device if inputs else None)
        extras = {}
        for mode in modes:
            programs[_model_name(mode, k)], extras[mode] = _export_mode(ex, mode, state, inputs)
        if meta is None:
            meta = _metadata(ex, package, modes, extras)
            meta["variants"] = []
        else:
            meta["variants"].append({f: v for f, v in _metadata(ex, package, modes, extras).items() if f in _VARIANT_FIELDS})
    extra_files = {_META_NAME: json.dumps(meta, indent=1)}
    root, ext = os.path.splitext(os.path.abspath(path))
    tmp = f"{root}.partial{ext or '.pt2'}"
    try:
        if package == "exported":
            package_pt2(tmp, exported_programs=programs, extra_files=extra_files)
        else:
            with tempfile.TemporaryDirectory(prefix="dynlrp_aoti_") as work:
                files = {name: _aoti_files(ep, os.path.join(work, name), inductor_configs) for name, ep in programs.items()}
                package_pt2(tmp, aoti_files=files, extra_files=extra_files)
        os.replace(tmp, path)  # never leave a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _not_an_explainer(obj: Any) -> DynlrpError:
    if isinstance(obj, LoadedExplainer):
        return DynlrpError(
            f"dynlrp.export needs the live explainer from dynlrp.compile; got a LoadedExplainer (from "
            f"dynlrp.load({obj.path!r})), which holds only the exported program, not the graphs export re-exports. "
            "To get another copy of the file, copy it (shutil.copyfile); to export with other options (package=, "
            "modes=), compile the model again with dynlrp.compile and export that explainer."
        )
    if isinstance(obj, nn.Module):
        return DynlrpError(
            f"dynlrp.export needs a compiled explainer, got the model {type(obj).__name__}: export "
            "dynlrp.compile(model, example_inputs) instead."
        )
    return DynlrpError(
        f"dynlrp.export needs the explainer returned by dynlrp.compile, got {type(obj).__name__}: export "
        "dynlrp.compile(model, example_inputs) instead."
    )


def _aoti_files(ep: torch.export.ExportedProgram, out_dir: str, configs: dict[str, Any] | None) -> list:
    """AOTInductor-compile one program into package files (what ``aoti_compile_and_package`` does per model)."""
    try:
        gm = ep.module(check_guards=False)
    except TypeError:  # older torch: no check_guards
        gm = ep.module()
    args, kwargs = ep.example_inputs
    options = dict(configs or {})
    options.update({"aot_inductor.package": True, "aot_inductor.output_path": out_dir})
    os.makedirs(out_dir, exist_ok=True)
    files = torch._inductor.aot_compile(gm, args, kwargs, options=options)
    if not isinstance(files, list):
        raise DynlrpError(f"AOTInductor returned {type(files).__name__}, expected a list of package files")
    return files


# -- loading: the archive ------------------------------------------------------------------------------------------
class _Archive:
    """A ``.pt2`` file read into memory once: :func:`load` checks these bytes and hands the same bytes to torch, so
    the file cannot change between the check and the load. Member names are relative to the archive's root folder
    and looked up case-insensitively, as torch's reader (miniz) does."""

    def __init__(self, path: str, data: bytes, zf: zipfile.ZipFile, root: str):
        self.path, self.data, self.zf, self.root = path, data, zf, root
        self.names = [i.filename[len(root) + 1 :] for i in zf.infolist()]
        self._by_lower = {n.lower(): root + "/" + n for n in self.names}

    def has(self, name: str) -> bool:
        return name.lower() in self._by_lower

    def read(self, name: str) -> bytes:
        return self.zf.read(self._by_lower[name.lower()])

    def actual(self, name: str) -> str:
        """The member's name as spelled in the archive."""
        return self._by_lower[name.lower()][len(self.root) + 1 :]


def _read_metadata(path: str) -> tuple[dict, _Archive]:
    """The dynlrp metadata of ``path`` and the file's bytes; :class:`DynlrpLoadError` for anything that is not an
    intact dynlrp file."""
    if not os.path.isfile(path):
        raise DynlrpLoadError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DynlrpLoadError(f"{path}: cannot be read ({e})") from None
    head = data[:4]
    if head != b"PK\x03\x04":
        raise DynlrpLoadError(
            f"{path}: not a dynlrp file: it is not a .pt2 (zip) archive at all (starts with {head!r}). Write one "
            "with dynlrp.export(explainer, path) or `dynlrp export`."
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
        names = [i.filename for i in infos]
        meta_name = next((n for n in names if n.endswith("/extra/" + _META_NAME) or n == "extra/" + _META_NAME), None)
        if meta_name is None:
            raise DynlrpLoadError(
                f"{path}: not a dynlrp file: a .pt2 archive without extra/{_META_NAME} (a plain torch.export "
                "or AOTInductor file?). Load it with torch.export.load / torch._inductor.aoti_load_package, "
                "or export the explainer with dynlrp.export."
            )
        bad = zf.testzip()
        if bad is not None:
            raise DynlrpLoadError(f"{path}: corrupt file: member {bad!r} fails its CRC check. Re-export it.")
        raw = zf.read(meta_name)
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
        raise DynlrpLoadError(
            f"{path}: truncated or corrupt file ({len(data)} bytes; {e}). It starts like a .pt2 "
            "archive but its zip directory cannot be read: the copy is incomplete. Copy or export it again."
        ) from None
    archive = _Archive(path, data, zf, _archive_root(path, infos))
    if meta_name != f"{archive.root}/extra/{_META_NAME}":
        raise _unsafe(path, meta_name, f"is not in the archive's root folder {archive.root!r}")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise DynlrpLoadError(f"{path}: corrupt file: {meta_name} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "dynlrp-fx":
        raise DynlrpLoadError(f"{path}: not a dynlrp file: {meta_name} does not describe a dynlrp-fx program")
    return meta, archive


def _unsafe(path: str, member: str, why: str) -> DynlrpLoadError:
    return DynlrpLoadError(
        f"{path}: refused: archive member {member!r} {why}. dynlrp.load only reads plain tensors and JSON and never "
        "runs code stored in a file; this file was not written by dynlrp.export or was modified afterwards. "
        "Re-export it from the live explainer with dynlrp.export, and do not open it with torch.export.load, "
        "torch.load or pickle either."
    )


def _archive_root(path: str, infos: list[zipfile.ZipInfo]) -> str:
    """The archive's root folder (torch's reader takes it from the first member and requires it of all), checking
    that every member name is unique case-insensitively (torch looks names up case-insensitively) and means the
    same to Python's zipfile as to torch's reader."""
    if not infos:
        raise DynlrpLoadError(f"{path}: corrupt file: an empty zip archive. Re-export it.")
    root = infos[0].filename.split("/", 1)[0]
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if info.orig_filename != name or "\\" in name or not name.startswith(root + "/"):
            raise _unsafe(path, info.orig_filename, f"is not a plain name inside the archive's root folder {root!r}")
        if name.lower() in seen:
            raise _unsafe(path, name, "appears twice (names compared case-insensitively, as torch reads them)")
        seen.add(name.lower())
    return root


def _check_layout(path: str, meta: dict) -> None:
    """The metadata entries :func:`load` needs before it reads the programs: a known package and known modes."""
    what = "re-export it with dynlrp.export, or upgrade dynlrp-fx if a newer release wrote it"
    package = meta.get("package")
    if package not in PACKAGES:
        found = "has no 'package' entry" if "package" not in meta else f"names package {package!r}"
        raise DynlrpLoadError(
            f"{path}: corrupt file: its dynlrp metadata {found}; this dynlrp-fx reads packages "
            f"{', '.join(map(repr, PACKAGES))}. The file is damaged or not from dynlrp.export: {what}."
        )
    modes = meta.get("modes")
    if not isinstance(modes, list) or not modes:
        raise DynlrpLoadError(
            f"{path}: corrupt file: its dynlrp metadata has no list of seed modes ('modes': {modes!r}); {what}."
        )
    for m in modes:
        if m not in MODES or modes.count(m) > 1:
            why = f"lists the seed mode {m!r} twice" if m in MODES else f"lists an unknown seed mode {m!r}"
            raise DynlrpLoadError(
                f"{path}: corrupt file: its dynlrp metadata {why}; this dynlrp-fx knows the modes "
                f"{', '.join(map(repr, MODES))}. {what[0].upper()}{what[1:]}."
            )


def _check_versions(path: str, meta: dict) -> None:
    fv = meta.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise DynlrpLoadError(
            f"{path}: written by dynlrp-fx {meta.get('dynlrp_version')} in file format {fv}; this dynlrp-fx reads "
            f"format {FORMAT_VERSION} and older. Upgrade dynlrp-fx."
        )
    saved, here = str(meta.get("torch_version", "?")), torch.__version__
    if meta.get("package") == "aoti":
        if _version_tuple(saved) != _version_tuple(here):
            raise DynlrpLoadError(
                f"{path}: incompatible torch version: this AOTInductor package was compiled against torch {saved} "
                f"and its kernels link against that release's C++ ABI; this is torch {here}. Load it with torch "
                f"{'.'.join(map(str, _version_tuple(saved)))}.x, or re-export it with this torch."
            )
    elif _version_tuple(saved) > _version_tuple(here):
        raise DynlrpLoadError(
            f"{path}: incompatible torch version: written with torch {saved}, newer than this torch {here}; "
            "torch.export files cannot be read by an older torch. Upgrade torch or re-export with this one."
        )


# -- loading: what a file may contain -------------------------------------------------------------------------------
# torch's load_pt2 unpickles, for every program ``models/<name>.json``: ``data/sample_inputs/<name>.pt`` (torch.load,
# retried with weights_only=False), every weight/constant whose config entry says ``use_pickle`` (weights_only=False),
# the legacy ``data/weights/<name>.pt`` / ``data/constants/<name>.pt`` (same retry), ``custom_obj_*`` constants
# (TorchScript unpickler) and ``opaque_obj_*`` constants (pickle.loads). Its deserializer also evaluates every
# ``expr_str`` with sympy.sympify (Python eval) and generates and exec()s Python code for each graph from the node,
# input and argument names in the JSON; ExportedProgram.module() exec()s the file's ``guards_code``. _check_archive
# refuses all of these before torch reads the file; _check_graph refuses call targets that are not operators.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOTTED = re.compile(r"(?:[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?\Z")  # module paths, op names; "" = the root
_RECORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_PROGRAM = re.compile(r"models/([A-Za-z_][A-Za-z0-9_]*)\.json\Z")
_SYM_STRING = re.compile(r"[A-Za-z0-9_.+\-]*\Z")  # Symbol('s0'), Float('0.5')
_NAME_KEYS = frozenset({"name", "as_name", "forward_arg_names"})  # become Python identifiers in generated code
_MAX_EXPR = 20_000


def _check_archive(path: str, meta: dict, arc: _Archive) -> None:
    """Refuse, before torch reads anything, every member that torch would unpickle or evaluate as code."""
    programs = []
    for name in arc.names:
        if name.startswith("models/"):
            m = _PROGRAM.match(name)
            if m is None:
                raise _unsafe(path, name, "is not a program file models/<identifier>.json")
            programs.append(m.group(1))
        elif name.startswith("data/aotinductor/") and meta["package"] != "aoti":
            raise _unsafe(path, name, "is compiled AOTInductor code in a file whose metadata says package='exported'")
    for prog in programs:
        for legacy in (f"data/weights/{prog}.pt", f"data/constants/{prog}.pt"):
            if arc.has(legacy):
                raise _unsafe(
                    path, arc.actual(legacy), "is a pickled (legacy-format) state file; dynlrp.export never writes one"
                )
        _check_payload_config(path, arc, f"data/weights/{prog}_weights_config.json", "data/weights/", "weight_")
        _check_payload_config(path, arc, f"data/constants/{prog}_constants_config.json", "data/constants/", "tensor_")
        if arc.has(f"data/sample_inputs/{prog}.pt"):
            _check_tensor_file(path, arc, f"data/sample_inputs/{prog}.pt")
        _check_program_json(path, arc, f"models/{prog}.json")


def _check_payload_config(path: str, arc: _Archive, member: str, folder: str, prefix: str) -> None:
    """A weights/constants config: every entry a raw tensor record (``use_pickle`` false), no pickled objects."""
    if not arc.has(member):
        return  # torch refuses the file itself
    member = arc.actual(member)
    try:
        config = json.loads(arc.read(member))
    except ValueError as e:
        raise _unsafe(path, member, f"is not valid JSON ({e})") from None
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _unsafe(path, member, "is not a tensor payload config ({'config': {...}})")
    for fqn, entry in entries.items():
        if not _DOTTED.match(fqn) or not isinstance(entry, dict):
            raise _unsafe(path, member, f"has a malformed entry {fqn!r}")
        if entry.get("use_pickle") is not False:
            raise _unsafe(
                path,
                member,
                f"marks {fqn!r} as pickled (use_pickle: {entry.get('use_pickle')!r}); torch would "
                "unpickle it with weights_only=False, which can run arbitrary code",
            )
        record = entry.get("path_name")
        if not isinstance(record, str) or not _RECORD.match(record) or not record.startswith(prefix):
            raise _unsafe(
                path,
                member,
                f"stores {fqn!r} as {record!r}, not a raw tensor record {folder}{prefix}<n> "
                "(pickled and script objects are refused)",
            )
        if entry.get("tensor_meta") is None:
            raise _unsafe(path, member, f"has no tensor metadata for {fqn!r}")


def _check_tensor_file(path: str, arc: _Archive, member: str) -> None:
    """A torch.save file that torch.load(weights_only=True) accepts (tensors and containers only). torch's own
    loader would retry a refused file with weights_only=False."""
    raw, member = arc.read(member), arc.actual(member)
    if not raw:
        return
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any refusal of the restricted unpickler
        raise _unsafe(
            path,
            member,
            f"is not a plain tensor file: torch.load(weights_only=True) refuses it ({_unpickler_reason(e)}), and "
            "torch's own loader would retry it with weights_only=False, which can run arbitrary code",
        ) from None
    if not isinstance(value, (tuple, dict)):
        raise _unsafe(path, member, f"holds a {type(value).__name__}, not the tuple of example inputs")


def _unpickler_reason(e: Exception) -> str:
    """The gist of a torch.load refusal (torch's message goes on to suggest weights_only=False)."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please|\n|$)", msg)
    text = m.group(1) if m else (msg.strip().splitlines() or [""])[0]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()[:200]  # torch's terminal bold
    return f"{type(e).__name__}: {text}"


def _check_program_json(path: str, arc: _Archive, member: str) -> None:
    """The serialized program: names that become Python code are identifiers, symbolic expressions (evaluated by
    sympy.sympify) are plain arithmetic, and no string breaks out of the generated code's lines."""
    try:
        doc = json.loads(arc.read(member))
    except ValueError as e:
        raise _unsafe(path, member, f"is not valid JSON ({e})") from None
    try:
        _check_json(doc, None, lambda why: _unsafe(path, member, why))
    except RecursionError:
        raise _unsafe(path, member, "is nested too deeply") from None


def _check_json(obj: Any, key: str | None, fail) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not _DOTTED.match(k):
                raise fail(f"has the key {k[:80]!r}, not an identifier or module path")
            _check_json(v, k, fail)
    elif isinstance(obj, list):
        for v in obj:
            _check_json(v, key, fail)
    elif isinstance(obj, str):
        _check_json_string(obj, key, fail)


def _check_json_string(s: str, key: str | None, fail) -> None:
    if "\x00" in s or "\r" in s:
        raise fail(f"has a control character in its {key!r} entry")
    if key == "expr_str":
        _check_sym_expr(s, fail)
    elif key in _NAME_KEYS:
        if not _IDENT.match(s):
            raise fail(f"has the {key!r} {s[:80]!r}, which is not a Python identifier")
    elif key in ("target", "fqn") or (key or "").endswith(("_name", "_names")):
        if not _DOTTED.match(s):
            raise fail(f"has the {key!r} {s[:80]!r}, which is not an operator name or module path")
    elif key in ("in_spec", "out_spec"):
        _check_treespec(s, key, fail)
    elif key not in ("stack_trace", "guards_code") and "\n" in s:  # guards_code is never run (check_guards=False)
        raise fail(f"has a line break in its {key!r} entry")


def _check_treespec(s: str, key: str, fail) -> None:
    """A pytree spec: its type names and dict keys end up in generated code."""
    try:
        spec = json.loads(s)
    except ValueError:
        raise fail(f"has an unreadable {key!r}") from None

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "context" and isinstance(v, str):
                    try:
                        walk_context(json.loads(v))
                    except ValueError:
                        raise fail(f"has an unreadable context in its {key!r}") from None
                elif k == "type" and v is not None and not (isinstance(v, str) and _DOTTED.match(v)):
                    raise fail(f"names the type {str(v)[:80]!r} in its {key!r}")
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    def walk_context(o: Any) -> None:
        if isinstance(o, str):
            if not _DOTTED.match(o):
                raise fail(f"has the key {o[:80]!r} in its {key!r}, not an identifier")
        elif isinstance(o, (list, dict)):
            for v in o if isinstance(o, list) else [*o.keys(), *o.values()]:
                walk_context(v)

    walk(spec)


@functools.lru_cache(maxsize=1)
def _sympy_names() -> tuple[frozenset[str], frozenset[str]]:
    """``(sympy classes and constants, every other name in scope)`` for an expression given to sympy.sympify,
    which evaluates the text with Python's eval among sympy's exports and the builtins (other names become
    Symbols)."""
    import sympy
    import torch.utils._sympy.functions as torch_sympy

    ok = set()
    for mod in (sympy, torch_sympy):
        for n in dir(mod):
            v = getattr(mod, n, None)
            if (isinstance(v, type) and issubclass(v, sympy.Basic)) or isinstance(v, sympy.Basic):
                ok.add(n)
    scope = set(dir(builtins)) | set(getattr(sympy, "__all__", ())) | set(dir(sympy))
    return frozenset(ok), frozenset(scope - ok)


_SYM_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.Tuple, ast.List, ast.BinOp,
    ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift, ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And,
    ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip


def _check_sym_expr(s: str, fail) -> None:
    """A symbolic shape expression as torch writes it (``srepr``: ``Mul(Integer(2), Symbol('s0', integer=True))``):
    calls of sympy classes on numbers, symbol names and arithmetic; no attributes, subscripts, lambdas or builtins."""
    why = None
    if len(s) > _MAX_EXPR:
        why = "is too long"
    else:
        try:
            tree = ast.parse(s, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            tree, why = None, "is not an expression"
        if tree is not None:
            ok, banned = _sympy_names()
            for node in ast.walk(tree):
                if not isinstance(node, _SYM_NODES):
                    why = f"contains {type(node).__name__}"
                elif isinstance(node, ast.Name) and (node.id.startswith("_") or node.id in banned):
                    why = f"uses the name {node.id!r}"
                elif isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in ok):
                    why = f"calls {ast.unparse(node.func)[:40]!r}, not a sympy class"
                elif isinstance(node, ast.keyword) and (node.arg is None or node.arg.startswith("_")):
                    why = "has a ** or private keyword argument"
                elif isinstance(node, ast.Constant) and not (
                    node.value is None
                    or isinstance(node.value, (bool, int, float))
                    or (isinstance(node.value, str) and _SYM_STRING.match(node.value))
                ):
                    why = f"has the constant {str(node.value)[:40]!r}"
                if why:
                    break
    if why:
        raise fail(f"has a symbolic expression that {why} (sympy evaluates it as Python code): {s[:120]!r}")


#: Python-level call targets a deserialized graph may hold besides operators (torch's symbolic-shape ops, getitem)
_PY_TARGETS = frozenset(
    {
        *(getattr(operator, n) for n in (
            "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow",
            "truediv", "and_", "or_", "lshift", "rshift", "getitem",
        )),
        math.trunc, torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min,
        *(f for f in (getattr(torch, "sym_sqrt", None),) if f is not None),
    }
)  # fmt: skip
#: operators with file, network or process side effects that a relevance graph never calls
_DENIED_OPS = frozenset({"aten::save", "aten::from_file"})
_DENIED_NAMESPACES = frozenset({"c10d", "c10d_functional", "_c10d_functional", "_c10d_functional_autograd", "symm_mem"})


def _check_graph(path: str, name: str, gm: torch.nn.Module) -> None:
    """Every node of the deserialized program (and of its subgraphs) calls an operator, not arbitrary Python."""
    for _, sub in gm.named_modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            where = f"models/{name}.json"
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                if not (isinstance(node.target, str) and _DOTTED.match(node.target)):
                    raise _unsafe(path, where, f"reads the attribute {str(node.target)[:80]!r}")
                continue
            target = node.target
            if node.op != "call_function":
                raise _unsafe(path, where, f"has a {node.op!r} node ({str(target)[:80]}); only operators are allowed")
            if isinstance(target, torch._ops.OpOverload):
                qual = target._schema.name
                if qual in _DENIED_OPS or qual.split("::", 1)[0] in _DENIED_NAMESPACES:
                    raise _unsafe(path, where, f"calls {qual}, an operator with file or network side effects")
            elif not (isinstance(target, torch._ops.HigherOrderOperator) or target in _PY_TARGETS):
                raise _unsafe(
                    path,
                    where,
                    f"calls {getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}, "
                    "which is not an operator (torch.ops.*)",
                )


class LoadedExplainer:
    """An explainer loaded from a ``.pt2`` file by :func:`load`; called like the :class:`~dynlrp_fx.Explainer`.

    ``f(*args, target=None, seed=None, **kwargs) -> Explanation``, with the same input structure as the example
    inputs of the original explainer (any batch size). Needs neither the model's code nor a compile step. Inputs are
    bound and checked, and outputs unpacked, by the same :class:`~dynlrp_fx.runtime.CallPath` as a live explainer's,
    with the file's input specification.

    Attributes
    ----------
    path, package ("exported" or "aoti"), rules (the composite's name), output_name, input_names,
    metadata (the file's full metadata dict), modes (the seed modes stored), call_spec (the input specification).
    """

    def __init__(self, path: str, meta: dict, programs: dict[str, Any]):
        self.path = path
        self.metadata = meta
        self.package = meta["package"]
        self.rules = meta["rules"]
        self.modes = tuple(meta["modes"])
        self.output_name = meta["output"]["name"]
        self._programs = programs
        self._outputs = {
            m: ProgramOutputs(**{k: list(meta["relevance_outputs"][m].get(k, [])) for k in _NAME_FIELDS})
            for m in programs
        }
        self.call_spec = CallSpec.from_metadata(meta, _dtype)
        self._call = CallPath(self.call_spec, self._run)
        #: the programs for other input shapes the explainer had built when it was exported
        self.variants: list[LoadedExplainer] = []

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs whose relevance is returned."""
        return list(self._outputs[self.modes[0]].input_names)

    def rule_table(self) -> list[dict[str, Any]]:
        """The rule table of the explainer at export time (see :meth:`Explainer.rule_table`)."""
        return list(self.metadata.get("rule_table", []))

    def __repr__(self) -> str:
        ins = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.metadata["inputs"])
        return (
            f"LoadedExplainer({self.path!r}, package={self.package!r}, rules={self.rules!r}, inputs=({ins}), "
            f"output={self.output_name!r}, modes={self.modes})"
        )

    def __call__(self, *args, target: Any = None, seed: torch.Tensor | None = None, sweep_batch: int | None = None,
                 **kwargs) -> Explanation:
        """Explain on these inputs; see :meth:`Explainer.forward`. Raises :class:`DynlrpLoadError` (also a
        :class:`DynlrpInputError`) when the inputs do not match the file's input specification.

        Several targets per sample (``target=`` of shape ``(B, K)``) give the live explainer's results; a loaded
        program has no separate forward graph, so it runs on the inputs repeated ``K`` times (``sweep_batch`` is
        accepted for the same signature and not used)."""
        try:  # this program, else one stored for other input shapes
            return explain_first_that_fits([self._call, *(v._call for v in self.variants)], args, kwargs, target,
                                           seed, sweep_batch)[0]
        except DynlrpLoadError:
            raise
        except DynlrpInputError as e:
            shapes = [v.metadata["inputs"] for v in [self, *self.variants]]
            extra = (f" The file holds programs for these input shapes: "
                     f"{[[(s['name'], s['shape']) for s in ins] for ins in shapes]}; explain inputs of another shape "
                     "with the live explainer once before exporting it." if isinstance(e, DynlrpShapeError) else "")
            raise DynlrpLoadedInputError(f"{self.path}: {e}{extra}") from None

    def _run(self, mode: str, tensors: list[torch.Tensor], extra: torch.Tensor, batch: int):
        """The call path's runner: the stored program of ``mode`` (its state tensors live inside it)."""
        if mode not in self._programs:
            raise DynlrpLoadedInputError(
                f"{self.path} holds only the {'/'.join(self.modes)} mode(s); {mode}= calls need a file exported "
                f"with modes=('target', 'seed')"
            )
        return self._programs[mode](*tensors, extra), self._outputs[mode]


def load(path: str | os.PathLike) -> LoadedExplainer:
    """Load a file written by :func:`export`; the result is called like the explainer and returns Explanations.

    Nothing stored in the file is executed: the archive is read into memory and checked before torch sees it (no
    pickled weights, constants or objects; example inputs only if ``torch.load(weights_only=True)`` accepts them;
    program JSON whose names and symbolic expressions cannot turn into code), and the loaded graphs may only call
    operators. ``package="aoti"`` files are compiled native code, which loading runs by design: load those only from
    sources you trust.

    Raises
    ------
    DynlrpLoadError: the file is missing, not a dynlrp file, truncated or corrupt, written by an incompatible
        torch or dynlrp-fx version, holds content that could run code (pickles, code in the program JSON), or
        cannot be deserialised. Calling the result with inputs of the wrong rank, dtype or shape raises it too.
    """
    path = os.fspath(path)
    meta, archive = _read_metadata(path)
    _check_versions(path, meta)
    _check_layout(path, meta)
    _check_archive(path, meta, archive)
    _, load_pt2 = _archive_api()
    try:
        contents = load_pt2(io.BytesIO(archive.data))  # the bytes just checked, not the file again
    except Exception as e:  # noqa: BLE001 - any deserialisation failure
        raise DynlrpLoadError(
            f"{path}: the {meta['package']} program could not be deserialised by torch {torch.__version__} "
            f"(written with torch {meta.get('torch_version')}): {type(e).__name__}: {e}"
        ) from e
    def programs(variant: int) -> dict[str, Any]:
        out = {}
        for mode in meta["modes"]:
            name = _model_name(mode, variant)
            if meta["package"] == "aoti":
                out[mode] = contents.aoti_runners.get(name)
            else:
                ep = contents.exported_programs.get(name)
                out[mode] = _program_module(path, name, ep) if ep is not None else None
            if out[mode] is None:
                raise DynlrpLoadError(
                    f"{path}: corrupt file: the {mode!r} program ({name}) listed in the metadata is missing"
                )
        return out

    try:
        loaded = LoadedExplainer(path, meta, programs(0))
        for k, variant in enumerate(meta.get("variants") or [], start=1):
            loaded.variants.append(LoadedExplainer(path, {**meta, **variant, "variants": []}, programs(k)))
        return loaded
    except (KeyError, TypeError, ValueError, NotImplementedError, AttributeError) as e:
        raise DynlrpLoadError(
            f"{path}: corrupt file: its dynlrp metadata is incomplete or unreadable ({type(e).__name__}: {e})"
        ) from e


def _program_module(path: str, name: str, ep: torch.export.ExportedProgram) -> torch.nn.Module:
    """The callable module of a checked program. ``check_guards=False``: the guard function torch would build
    exec()s the file's ``guards_code`` strings; inputs are checked by the call path and the range constraints."""
    _check_graph(path, name, ep.graph_module)
    try:
        try:
            module = ep.module(check_guards=False)
        except TypeError:  # older torch: no check_guards (and no guards_code)
            module = ep.module()
    except Exception as e:  # noqa: BLE001 - any unlifting failure
        raise DynlrpLoadError(
            f"{path}: the program {name!r} could not be rebuilt by torch {torch.__version__}: {type(e).__name__}: {e}"
        ) from e
    _check_graph(path, name, module)
    return module
