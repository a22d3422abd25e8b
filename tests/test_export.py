"""Ahead-of-time export (``dynlrp.export`` / ``dynlrp.load`` / ``dynlrp export``).

Oracle: the loaded file, run in a fresh process that never imports the model's library, equals the in-process
explainer (target and seed modes, several batch sizes); LRP-0 through the CLI equals gradient x input; every load
failure raises :class:`DynlrpLoadError` naming the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.errors import DynlrpInputError, DynlrpLoadError
from tests.helpers import tiny_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(atol=1e-5, rtol=1e-5)

# Runs in a fresh interpreter: loads the file, explains each batch, checks that the model libraries were never
# imported, and saves the results for the parent to compare.
_CHILD = textwrap.dedent(
    """
    import sys, torch
    import dynlrp_fx as dynlrp
    torch.set_num_threads(1)
    path, cases_path, out_path = sys.argv[1:4]
    f = dynlrp.load(path)
    out = []
    for case in torch.load(cases_path):
        e = f(*case["args"], target=case.get("target"), seed=case.get("seed"), **case["kwargs"])
        out.append({"output": e.output, "inputs": e.inputs, "absorbed": e.absorbed, "seed": e.conservation.seed})
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "transformers"))
    assert not leaked, f"the loaded file imported {leaked[:5]}"
    torch.save({"results": out, "rules": f.rules, "repr": repr(f)}, out_path)
    """
)


def _run_fresh(path: str, cases: list[dict], tmp_path) -> dict:
    cases_path, out_path = str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")
    torch.save(cases, cases_path)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, path, cases_path, out_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_path)


def _compare(explainer, cases: list[dict], got: dict) -> None:
    assert len(got["results"]) == len(cases)
    for case, res in zip(cases, got["results"]):
        ref = explainer(*case["args"], target=case.get("target"), seed=case.get("seed"), **case["kwargs"])
        torch.testing.assert_close(res["output"], ref.output, **TOL)
        assert res["inputs"].keys() == ref.inputs.keys() and ref.inputs
        for k in ref.inputs:
            torch.testing.assert_close(res["inputs"][k], ref.inputs[k], **TOL)
        torch.testing.assert_close(res["absorbed"], ref.absorbed, **TOL)
        torch.testing.assert_close(res["seed"], ref.conservation.seed, **TOL)


# -- models ---------------------------------------------------------------------------------------------------------
def _tv_cnn() -> nn.Module:
    """A small CNN made of torchvision blocks (so the fresh process would need torchvision to rebuild it)."""
    from torchvision.ops import Conv2dNormActivation

    return nn.Sequential(
        Conv2dNormActivation(3, 6, 3),
        nn.MaxPool2d(2),
        Conv2dNormActivation(6, 8, 3, activation_layer=nn.ReLU),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _tiny_bert() -> nn.Module:
    return tiny_bert(vocab_size=100, num_hidden_layers=1)


def _tokens(b: int, s: int) -> dict:
    ids = torch.randint(0, 100, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 2 :] = 0  # padding in the first sample
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    explainer = dynlrp.compile(_tv_cnn(), torch.randn(2, 3, 10, 10), backend="eager")
    path = str(tmp_path_factory.mktemp("cnn") / "cnn.pt2")
    dynlrp.export(explainer, path)
    return explainer, path


# -- round trips ----------------------------------------------------------------------------------------------------
def test_cnn_fresh_process_matches_explainer(cnn, tmp_path):
    explainer, path = cnn
    cases = []
    for b, target in ((1, None), (3, 2), (5, [0, 1, 2, 3, 4])):
        cases.append({"args": (torch.randn(b, 3, 10, 10),), "kwargs": {}, "target": target})
    cases.append({"args": (torch.randn(3, 3, 10, 10),), "kwargs": {}, "seed": torch.randn(3, 5)})
    got = _run_fresh(path, cases, tmp_path)
    _compare(explainer, cases, got)
    assert got["rules"] == "epsilon"


@pytest.mark.parametrize(
    "modes", [pytest.param(m, marks=pytest.mark.slow) for m in (("target",), ("target", "seed"))],
    ids=["target", "target+seed"],  # ~22-32 s each: in CI's slow step (test-slow-ci)
)
def test_bert_fresh_process_dynamic_batch_and_seq(tmp_path, modes):
    """input_ids + attention_mask keywords; batch and sequence length dynamic (the default for token inputs). The
    default run stores only the target mode (the CNN test covers seed=); the slow variant stores both."""
    torch.manual_seed(0)
    explainer = dynlrp.compile(_tiny_bert(), example_kwargs=_tokens(2, 8), backend="eager")
    path = str(tmp_path / "bert.pt2")
    dynlrp.export(explainer, path, modes=modes)
    cases = [{"args": (), "kwargs": _tokens(b, s), "target": t} for b, s, t in ((1, 8, None), (3, 5, 1), (5, 11, None))]
    if "seed" in modes:
        cases.append({"args": (), "kwargs": _tokens(3, 8), "seed": torch.randn(3, 3)})
    got = _run_fresh(path, cases, tmp_path)
    _compare(explainer, cases, got)
    assert "input_ids: int64" in got["repr"] and "attention_mask: int64" in got["repr"]


def test_metadata_and_plain_torch_load(cnn):
    explainer, path = cnn
    f = dynlrp.load(path)
    meta = f.metadata
    assert meta["torch_version"] == torch.__version__ and meta["dynlrp_version"] == dynlrp.__version__
    assert meta["rules"] == "epsilon" and meta["package"] == "exported" and f.modes == ("target", "seed")
    assert [(s["name"], s["dtype"], len(s["shape"]), s["batched"]) for s in meta["inputs"]] == [
        ("input", "float32", 4, True)
    ]
    assert isinstance(meta["inputs"][0]["shape"][0], str) and meta["inputs"][0]["shape"][1:] == [3, 10, 10]
    assert f.input_names == explainer.input_names and f.rule_table() == json.loads(json.dumps(explainer.rule_table()))
    # the target-mode program is the archive's default model: plain torch can run it (state inside the file)
    ep = torch.export.load(path)
    x = torch.randn(4, 3, 10, 10)
    y, seed_total, absorbed, rel = ep.module()(x, torch.full((4,), -1))
    ref = explainer(x)
    torch.testing.assert_close(rel, ref.relevance, **TOL)
    torch.testing.assert_close(seed_total, ref.conservation.seed, **TOL)


# -- load errors ----------------------------------------------------------------------------------------------------
def _load_error(path) -> str:
    with pytest.raises(DynlrpLoadError) as info:
        dynlrp.load(path)
    return str(info.value)


def test_load_rejects_bad_files(cnn, tmp_path):
    _, path = cnn
    data = open(path, "rb").read()
    trunc = tmp_path / "trunc.pt2"
    trunc.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _load_error(trunc)
    rnd = tmp_path / "random.pt2"
    rnd.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes()
    )
    msg = _load_error(rnd)
    assert "not a dynlrp file" in msg and "zip" in msg
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(3, 2), (torch.randn(2, 3),)), str(plain))
    assert "not a dynlrp file" in _load_error(plain) and "dynlrp.json" in _load_error(plain)
    assert "no such file" in _load_error(tmp_path / "missing.pt2")
    # flip bytes inside a stored member: the CRC check names it
    flipped = bytearray(data)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("models/model.json"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    flipped[start : start + 8] = b"XXXXXXXX"
    (tmp_path / "flipped.pt2").write_bytes(bytes(flipped))
    assert "CRC" in _load_error(tmp_path / "flipped.pt2")


def _rewrite_meta(src: str, dst, **changes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            raw = zin.read(item.filename)
            if item.filename.endswith("extra/dynlrp.json"):
                raw = json.dumps({**json.loads(raw), **changes}).encode()
            zout.writestr(item, raw)


def test_load_rejects_incompatible_versions(cnn, tmp_path):
    _, path = cnn
    _rewrite_meta(path, tmp_path / "newer.pt2", torch_version="99.1.0")
    msg = _load_error(tmp_path / "newer.pt2")
    assert "incompatible torch version" in msg and "99.1.0" in msg and torch.__version__ in msg
    _rewrite_meta(path, tmp_path / "aoti_old.pt2", torch_version="2.6.0", package="aoti")
    msg = _load_error(tmp_path / "aoti_old.pt2")
    assert "incompatible torch version" in msg and "AOTInductor" in msg
    _rewrite_meta(path, tmp_path / "format.pt2", format_version=99)
    assert "format 99" in _load_error(tmp_path / "format.pt2")
    _rewrite_meta(path, tmp_path / "meta.pt2", in_spec="{garbage")
    assert "metadata is incomplete or unreadable" in _load_error(tmp_path / "meta.pt2")


def test_call_rejects_wrong_inputs(cnn):
    _, path = cnn
    f = dynlrp.load(path)
    cases = [
        ((torch.randn(3, 10, 10),), {}, "has 3 dimensions"),
        ((torch.randn(2, 3, 10, 10, dtype=torch.float64),), {}, "dtype torch.float64"),
        ((torch.randn(2, 3, 11, 10),), {}, "dimension 2 must be 10"),
        ((torch.randn(2, 3, 10, 10),), {"seed": torch.randn(3, 5)}, "seed= has shape (3, 5)"),
        ((torch.randn(2, 3, 10, 10),), {"target": [1, 2, 3]}, "target has 3 entries"),
        ((torch.randn(2, 3, 10, 10),), {"target": 7}, "out of range"),
        ((torch.randn(2, 3, 10, 10), torch.randn(2)), {}, "another structure"),
    ]
    for args, kwargs, needle in cases:
        with pytest.raises(DynlrpLoadError) as info:
            f(*args, **kwargs)
        assert needle in str(info.value) and path in str(info.value)
        assert isinstance(info.value, DynlrpInputError)


def test_target_only_file_refuses_seed(tmp_path):
    from tests.helpers import small_cnn

    explainer = dynlrp.compile(small_cnn(), torch.randn(2, 3, 8, 8), backend="eager", rules="lrp0")
    path = dynlrp.export(explainer, tmp_path / "t.pt2", modes=("target",))
    f = dynlrp.load(path)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(f(x, target=1).relevance, explainer(x, target=1).relevance, **TOL)
    with pytest.raises(DynlrpLoadError, match="only the target mode"):
        f(x, seed=torch.randn(3, 5))


# -- command line ---------------------------------------------------------------------------------------------------
def _cli_export(model: str, shape: str, out, *extra: str, timeout: int) -> subprocess.CompletedProcess:
    """``python -m dynlrp_fx export`` in a fresh process; asserts that it succeeded."""
    cmd = [sys.executable, "-m", "dynlrp_fx", "export", "--model", model, "--input-shape", shape, *extra, "-o", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_export_lrp0_equals_grad_x_input(tmp_path):
    from tests.helpers import grad_x_input, small_cnn

    out = tmp_path / "cli.pt2"
    proc = _cli_export("tests.helpers:small_cnn", "2,3,8,8", out, "--rules", "lrp0", "--seed", "3", timeout=600)
    assert f"wrote {out}" in proc.stdout and "rules=lrp0" in proc.stdout
    f = dynlrp.load(out)
    assert f.rules == "lrp0"
    torch.manual_seed(3)
    model = small_cnn()  # same weights as the CLI built
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(f(x, target=2).relevance, grad_x_input(model, x, 2), atol=1e-6, rtol=1e-5)


def _cli(argv: list[str]) -> int:
    """Run only the ``export`` subcommand (independent of the other modules' subcommands)."""
    import argparse

    from dynlrp_fx.cli.export import register_cli

    parser = argparse.ArgumentParser(prog="dynlrp")
    register_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_errors_and_factory_spec(tmp_path, capsys):
    from dynlrp_fx.cli._models import import_callable as _factory

    out = ["-o", str(tmp_path / "x.pt2")]
    assert _cli(["export", "--model", "tests.helpers:not_a_module", "--input-shape", "2,3", *out]) == 1
    assert "not an nn.Module" in capsys.readouterr().err
    assert _cli(["export", "--model", "nocolon", "--input-shape", "2,3", *out]) == 1
    assert "MODULE:CALLABLE" in capsys.readouterr().err
    assert _cli(["export", "--model", "tests.helpers:small_cnn", "--input-shape", "2,x", *out]) == 1
    assert "--input-shape" in capsys.readouterr().err
    assert (
        _cli(["export", "--model", "tests.helpers:small_cnn", "--input-shape", "2,3,8,8", "--dtype", "int64", *out])
        == 1
    )
    assert "floating dtype" in capsys.readouterr().err
    assert not (tmp_path / "x.pt2").exists()
    import torchvision

    assert _factory("torchvision:resnet18") is torchvision.models.resnet18
    assert _factory("torchvision.models:resnet18") is torchvision.models.resnet18


# -- slow -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_package_on_cpu(tmp_path):
    """AOTInductor package (compiled C++ kernels) equals the explainer; torch's own loader runs it too."""
    torch.manual_seed(0)
    explainer = dynlrp.compile(_tv_cnn(), torch.randn(2, 3, 10, 10), backend="eager")
    path = dynlrp.export(explainer, tmp_path / "aoti.pt2", package="aoti")
    cases = [{"args": (torch.randn(b, 3, 10, 10),), "kwargs": {}, "target": t} for b, t in ((1, None), (3, 1), (5, 4))]
    cases.append({"args": (torch.randn(3, 3, 10, 10),), "kwargs": {}, "seed": torch.randn(3, 5)})
    got = _run_fresh(path, cases, tmp_path)
    _compare(explainer, cases, got)
    assert "package='aoti'" in got["repr"]
    runner = torch._inductor.aoti_load_package(path)
    x = torch.randn(4, 3, 10, 10)
    torch.testing.assert_close(runner(x, torch.full((4,), -1))[3], explainer(x).relevance, **TOL)


@pytest.mark.slow
def test_resnet18_cli_fresh_process(tmp_path):
    """The issue's example: `dynlrp export --model torchvision:resnet18` (small images to keep it fast)."""
    out = tmp_path / "resnet18.pt2"
    _cli_export("torchvision:resnet18", "2,3,64,64", out, timeout=1200)
    import torchvision

    torch.manual_seed(0)
    explainer = dynlrp.compile(torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64), backend="eager")
    cases = [{"args": (torch.randn(b, 3, 64, 64),), "kwargs": {}, "target": None} for b in (1, 3)]
    _compare(explainer, cases, _run_fresh(str(out), cases, tmp_path))
