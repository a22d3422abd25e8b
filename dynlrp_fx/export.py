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

Graph calling convention (both modes): ``(*input tensors, target_or_seed) -> (output, seed_total (B,),
absorbed (B,), *input relevances, *parameter relevances, *captured relevances)`` (the last two only with
``compile(params=..., capture=...)``); the target is ``(B,)`` int64 with ``-1`` = argmax.

Tested with torch 2.14 only. The archive API (``package_pt2``/``load_pt2``) is looked up in
``torch.export.pt2_archive`` and ``torch._inductor.package``; on a torch that has neither, :func:`export` and
:func:`load` raise a :class:`DynlrpError` naming the torch version.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
import zipfile
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import DynlrpError, DynlrpInputError, DynlrpLoadError
from .explainer import Explainer
from .passes.pair import ProgramOutputs
from .runtime import CallPath, CallSpec, Explanation, dim_spec

__all__ = ["export", "load", "LoadedExplainer", "FORMAT_VERSION", "PACKAGES"]

#: version of the dynlrp metadata layout (bumped on incompatible changes; :func:`load` refuses newer files)
FORMAT_VERSION = 1
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
                self.register_buffer(seen[key], t.detach())
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
            if not auto and re.fullmatch(r"[A-Za-z_]\w*", name):
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
    batched = [x for x, s in zip(inputs, explainer.call_spec.inputs) if s.batched]
    batch = batched[0].shape[0] if batched else 1
    device = inputs[0].device if inputs else None
    extra = torch.full((batch,), -1, dtype=torch.long, device=device)  # the target: argmax
    if mode == "seed":
        with torch.no_grad():
            extra = torch.ones_like(explainer.graph("target")(*state, *inputs, extra)[0])
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
        "output": {"name": traced.output_name, **(_tensor_spec(y_val) if y_val is not None else {})},
        "relevance_outputs": {m: _output_names(explainer, m) for m in modes},
        "extra_inputs": extras,
        "rule_table": explainer.rule_table(),
    }


#: the per-program output-name lists (:class:`~dynlrp_fx.passes.pair.ProgramOutputs`) the call path splits outputs by
_NAME_FIELDS = ("input_names", "param_names", "capture_names")


def _output_names(explainer: Explainer, mode: str) -> dict[str, list[str]]:
    outputs = explainer.program(mode).outputs
    return {f: list(getattr(outputs, f)) for f in _NAME_FIELDS}


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
    inductor_configs: extra ``torch._inductor.config`` options for ``package="aoti"``.

    Returns
    -------
    The path written.

    Raises
    ------
    DynlrpError: the graph could not be re-exported, or the explainer has non-tensor inputs that cannot be stored.
    """
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes!r}")
    package_pt2, _ = _archive_api()
    path = os.fspath(path)
    traced = explainer.traced
    inputs = [traced.example_flat[i].detach() for i in traced.tensor_leaf_index]
    state = explainer.state_tensors(inputs[0].device if inputs else None)
    programs, extras = {}, {}
    for mode in modes:
        programs[mode], extras[mode] = _export_mode(explainer, mode, state, inputs)
    meta = json.dumps(_metadata(explainer, package, modes, extras), indent=1)
    extra_files = {_META_NAME: meta}
    root, ext = os.path.splitext(os.path.abspath(path))
    tmp = f"{root}.partial{ext or '.pt2'}"
    try:
        if package == "exported":
            package_pt2(
                tmp, exported_programs={_MODEL_NAMES[m]: ep for m, ep in programs.items()}, extra_files=extra_files
            )
        else:
            with tempfile.TemporaryDirectory(prefix="dynlrp_aoti_") as work:
                files = {
                    _MODEL_NAMES[m]: _aoti_files(ep, os.path.join(work, m), inductor_configs)
                    for m, ep in programs.items()
                }
                package_pt2(tmp, aoti_files=files, extra_files=extra_files)
        os.replace(tmp, path)  # never leave a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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


# -- loading --------------------------------------------------------------------------------------------------------
def _read_metadata(path: str) -> tuple[dict, str]:
    """The dynlrp metadata of ``path``; :class:`DynlrpLoadError` for anything that is not an intact dynlrp file."""
    if not os.path.isfile(path):
        raise DynlrpLoadError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04":
        raise DynlrpLoadError(
            f"{path}: not a dynlrp file: it is not a .pt2 (zip) archive at all (starts with {head!r}). Write one "
            "with dynlrp.export(explainer, path) or `dynlrp export`."
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            meta_name = next(
                (n for n in names if n.endswith("/extra/" + _META_NAME) or n == "extra/" + _META_NAME), None
            )
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
            f"{path}: truncated or corrupt file ({os.path.getsize(path)} bytes; {e}). It starts like a .pt2 "
            "archive but its zip directory cannot be read: the copy is incomplete. Copy or export it again."
        ) from None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise DynlrpLoadError(f"{path}: corrupt file: {meta_name} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "dynlrp-fx":
        raise DynlrpLoadError(f"{path}: not a dynlrp file: {meta_name} does not describe a dynlrp-fx program")
    return meta, meta_name


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

    def __call__(self, *args, target: Any = None, seed: torch.Tensor | None = None, **kwargs) -> Explanation:
        """Explain on these inputs; see :meth:`Explainer.forward`. Raises :class:`DynlrpLoadError` (also a
        :class:`DynlrpInputError`) when the inputs do not match the file's input specification."""
        try:
            return self._call.explain(args, kwargs, target, seed)
        except DynlrpLoadError:
            raise
        except DynlrpInputError as e:
            raise DynlrpLoadedInputError(f"{self.path}: {e}") from None

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

    Raises
    ------
    DynlrpLoadError: the file is missing, not a dynlrp file, truncated or corrupt, written by an incompatible
        torch or dynlrp-fx version, or cannot be deserialised. Calling the result with inputs of the wrong rank,
        dtype or shape raises it too.
    """
    path = os.fspath(path)
    meta, _ = _read_metadata(path)
    _check_versions(path, meta)
    _, load_pt2 = _archive_api()
    try:
        contents = load_pt2(path)
    except Exception as e:  # noqa: BLE001 - any deserialisation failure
        raise DynlrpLoadError(
            f"{path}: the {meta.get('package')} program could not be deserialised by torch {torch.__version__} "
            f"(written with torch {meta.get('torch_version')}): {type(e).__name__}: {e}"
        ) from e
    programs = {}
    for mode in meta.get("modes", []):
        name = _MODEL_NAMES[mode]
        if meta["package"] == "aoti":
            runner = contents.aoti_runners.get(name)
            programs[mode] = runner
        else:
            ep = contents.exported_programs.get(name)
            programs[mode] = ep.module() if ep is not None else None
        if programs[mode] is None:
            raise DynlrpLoadError(
                f"{path}: corrupt file: the {mode!r} program ({name}) listed in the metadata is missing"
            )
    try:
        return LoadedExplainer(path, meta, programs)
    except (KeyError, TypeError, ValueError, NotImplementedError) as e:
        raise DynlrpLoadError(
            f"{path}: corrupt file: its dynlrp metadata is incomplete or unreadable ({type(e).__name__}: {e})"
        ) from e
