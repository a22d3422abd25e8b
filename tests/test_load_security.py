"""``dynlrp.load`` on files from untrusted places: nothing stored in a ``.pt2`` runs during load.

Oracle: each payload is live (unpickling it, or evaluating it the way torch's loader does, creates a marker file),
yet ``dynlrp.load`` of a file carrying it raises :class:`DynlrpLoadError` naming the member and the problem, and
the marker file does not exist afterwards. Metadata problems and ``export(loaded)`` raise clear dynlrp errors.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable

import pytest
import torch

import dynlrp_fx as dynlrp
from dynlrp_fx.errors import DynlrpError, DynlrpLoadError
from tests.helpers import small_cnn


class _Payload:
    """Unpickling it opens (creates) ``marker``: stands for any code an attacker would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload(marker) -> bytes:
    data = pickle.dumps(_Payload(str(marker)), protocol=2)
    pickle.loads(data).close()  # the payload is live: it creates the marker ...
    assert os.path.exists(marker)
    os.remove(marker)  # ... which must not come back during load
    return data


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> str:
    torch.manual_seed(0)
    explainer = dynlrp.compile(small_cnn(), torch.randn(2, 3, 8, 8), backend="eager")
    return dynlrp.export(explainer, tmp_path_factory.mktemp("sec") / "cnn.pt2")


Edit = Callable[[bytes], bytes | None]


def _rewrite(src: str, dst, edits: dict[str, Edit] | None = None, add: dict[str, bytes] | None = None) -> str:
    """Copy the archive, passing member ``name`` (relative to the root folder) through ``edits[name]`` (None drops
    it) and appending ``add``."""
    edits, add = edits or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.infolist()[0].filename.split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename[len(root) + 1 :]
            data = zin.read(info)
            if rel in edits:
                data = edits[rel](data)
                if data is None:
                    continue
            zout.writestr(info, data)
        for rel, data in add.items():
            zout.writestr(f"{root}/{rel}", data)
    return str(dst)


def _json_edit(fn: Callable[[dict], None]) -> Edit:
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        fn(doc)
        return json.dumps(doc).encode()

    return edit


def _refused(path, marker, *needles: str) -> str:
    """``load(path)`` raises a DynlrpLoadError containing ``needles``, and the payload never ran."""
    with pytest.raises(DynlrpLoadError) as info:
        dynlrp.load(path)
    assert marker is None or not os.path.exists(marker), f"the payload ran during load ({info.value})"
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


# -- the two payloads of the issue ----------------------------------------------------------------------------------
@pytest.mark.parametrize("member", ["data/sample_inputs/model.pt", "Data/Sample_Inputs/MODEL.pt"], ids=["", "case"])
def test_pickled_sample_inputs_never_run(pt2, tmp_path, member):
    """torch's loader unpickles the example inputs and retries a refused file with weights_only=False. torch looks
    member names up case-insensitively, so the payload also works under another spelling of the name."""
    marker = tmp_path / "ran"
    path = _rewrite(
        pt2, tmp_path / "evil.pt2", {"data/sample_inputs/model.pt": lambda _: None}, {member: _payload(marker)}
    )
    msg = _refused(path, marker, member, "weights_only=True", "GLOBAL")
    assert "refused" in msg and "re-export" in msg.lower()


@pytest.mark.parametrize("flag", [True, 1], ids=["true", "truthy"])
def test_pickled_weight_never_runs(pt2, tmp_path, flag):
    """A weights-config entry flipped to use_pickle: torch would torch.load(weights_only=False) its file."""
    marker = tmp_path / "ran"

    def flip(cfg: dict) -> None:
        cfg["config"]["state_0"]["use_pickle"] = flag

    edits = {
        "data/weights/model_weights_config.json": _json_edit(flip),
        "data/weights/weight_0": lambda _: _payload(marker),
    }
    path = _rewrite(pt2, tmp_path / "evil.pt2", edits)
    _refused(path, marker, "data/weights/model_weights_config.json", "'state_0'", "use_pickle")


# -- the other ways torch's loader runs code from the file ----------------------------------------------------------
def test_pickled_constant_and_legacy_state_files_refused(pt2, tmp_path):
    marker = tmp_path / "ran"
    payload = _payload(marker)
    with zipfile.ZipFile(pt2) as zf:
        weights = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))))
    meta = weights["config"]["state_0"]["tensor_meta"]  # float32: pad the pickle to whole elements

    def opaque(cfg: dict) -> None:  # torch pickle.loads every opaque_obj_* constant, whatever use_pickle says
        cfg["config"]["c"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": meta}

    path = _rewrite(
        pt2,
        tmp_path / "opaque.pt2",
        {"data/constants/model_constants_config.json": _json_edit(opaque)},
        {"data/constants/opaque_obj_0": payload + b"\0" * (-len(payload) % 4)},
    )
    _refused(path, marker, "data/constants/model_constants_config.json", "opaque_obj_0")
    # the legacy weights file is handed to torch.load, retried with weights_only=False
    path = _rewrite(pt2, tmp_path / "legacy.pt2", add={"data/weights/model.pt": payload})
    _refused(path, marker, "data/weights/model.pt", "pickled")


def test_code_in_program_json_never_runs(pt2, tmp_path):
    """torch's deserializer evaluates symbolic expressions with sympy.sympify (Python eval) and exec()s code it
    generates from the graph's names; both are checked before torch reads the program."""
    marker = tmp_path / "ran"
    opener = f"__import__('builtins').open({str(marker)!r}, 'w')"

    def in_expr(doc: dict) -> None:
        text = json.dumps(doc)
        sym = next(v for v in _strings(doc, "expr_str"))
        doc.clear()
        doc.update(json.loads(text.replace(json.dumps(sym), json.dumps(f"{sym} + 0*len(str({opener}))"))))

    def in_name(doc: dict) -> None:  # a placeholder name becomes a default argument of the generated forward()
        name = doc["graph_module"]["graph"]["inputs"][-1]["as_tensor"]["name"]
        text = json.dumps(doc).replace(json.dumps(name), json.dumps(f"{name}={opener}"))
        doc.clear()
        doc.update(json.loads(text))

    for label, fn, needle in (("expr", in_expr, "symbolic expression"), ("name", in_name, "not a Python identifier")):
        path = _rewrite(pt2, tmp_path / f"{label}.pt2", {"models/model.json": _json_edit(fn)})
        _refused(path, marker, "models/model.json", needle)


def test_guards_code_is_never_executed(pt2, tmp_path):
    """ExportedProgram.module() exec()s the file's guards_code; load builds the modules without it."""
    marker = tmp_path / "ran"

    def guard(doc: dict) -> None:
        doc["guards_code"].append(f"__import__('builtins').open({str(marker)!r}, 'w') is not None")

    path = _rewrite(pt2, tmp_path / "guard.pt2", {"models/model.json": _json_edit(guard)})
    f = dynlrp.load(path)
    f(torch.randn(3, 3, 8, 8))
    assert not marker.exists()


def test_ambiguous_archives_refused(pt2, tmp_path):
    """Members that Python's zipfile and torch's reader could resolve differently."""
    with zipfile.ZipFile(pt2) as zf:
        real = zf.read(next(n for n in zf.namelist() if n.endswith("data/sample_inputs/model.pt")))
    path = _rewrite(pt2, tmp_path / "dup.pt2", add={"data/sample_inputs/MODEL.PT": real})
    _refused(path, None, "appears twice")
    path = _rewrite(pt2, tmp_path / "aoti.pt2", add={"data/aotinductor/model/x.so": b"\x7fELF"})
    _refused(path, None, "data/aotinductor/model/x.so", "package='exported'")


def test_graph_may_only_call_operators(tmp_path):
    """The loaded graphs are checked again after deserialization (torch's verifier list comes from the file)."""
    from dynlrp_fx.export import _check_graph

    marker = tmp_path / "ran"
    for target in (open, torch.ops.aten.from_file.default):
        g = torch.fx.Graph()
        g.output(g.call_function(target, (str(marker), True, 4)))
        with pytest.raises(DynlrpLoadError, match="calls"):
            _check_graph("f.pt2", "model", torch.fx.GraphModule(torch.nn.Module(), g))
    assert not marker.exists()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.relu.default, (x,)))
    _check_graph("f.pt2", "model", torch.fx.GraphModule(torch.nn.Module(), g))  # operators pass


def _strings(obj, key: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _strings(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, key)


# -- metadata and export(loaded) ------------------------------------------------------------------------------------
def _meta_edit(fn: Callable[[dict], None]) -> dict[str, Edit]:
    return {"extra/dynlrp.json": _json_edit(fn)}


@pytest.mark.parametrize(
    "change, needles",
    [
        (lambda m: m.pop("package"), ("no 'package' entry", "'exported', 'aoti'", "re-export")),
        (lambda m: m.update(package="onnx"), ("package 'onnx'", "'exported', 'aoti'")),
        (lambda m: m.update(modes=["target", "bogus"]), ("unknown seed mode 'bogus'", "'target', 'seed'")),
        (lambda m: m.update(modes=["target", "target"]), ("seed mode 'target' twice",)),
        (lambda m: m.pop("modes"), ("no list of seed modes",)),
    ],
    ids=["no-package", "unknown-package", "unknown-mode", "duplicate-mode", "no-modes"],
)
def test_bad_metadata_is_a_load_error(pt2, tmp_path, change, needles):
    path = _rewrite(pt2, tmp_path / "meta.pt2", _meta_edit(change))
    _refused(path, None, "corrupt file", *needles)


def test_export_of_loaded_explainer_says_what_to_do(pt2, tmp_path):
    loaded = dynlrp.load(pt2)
    with pytest.raises(DynlrpError) as info:
        dynlrp.export(loaded, tmp_path / "again.pt2")
    msg = str(info.value)
    assert "LoadedExplainer" in msg and "live explainer" in msg and "dynlrp.compile" in msg and "copy" in msg
    with pytest.raises(DynlrpError, match="dynlrp.compile"):
        dynlrp.export(small_cnn(), tmp_path / "model.pt2")
    assert not (tmp_path / "again.pt2").exists() and not (tmp_path / "model.pt2").exists()


def test_unmodified_file_still_loads(pt2):
    f = dynlrp.load(pt2)
    x = torch.randn(3, 3, 8, 8)
    assert f(x, target=1).relevance.shape == x.shape
    assert f(x, seed=torch.randn(3, 5)).relevance.shape == x.shape
