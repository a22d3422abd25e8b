"""Every CLI error is one line on stderr (what, where, what to do) with a non-zero exit code; ``--debug`` shows the
traceback; torch's own logging is quiet while dynlrp traces (``trace._export``), and its logger levels are restored.

Tiny models only (``tests.helpers:covered_model``: an MLP on (B, 4) inputs, 3 outputs; ``small_cnn``: (B, 3, 8, 8)).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.cli import main
from dynlrp_fx.cli._errors import one_line
from tests.helpers import covered_model

ROOT = Path(__file__).resolve().parents[1]
MLP = "tests.helpers:covered_model"

#: the loggers whose level trace._export raises (prefixes; children included)
TORCH_LOGGERS = (
    "torch._dynamo",
    "torch._export",
    "torch.export",
    "torch._subclasses",
    "torch._functorch",
    "torch._guards",
    "torch.fx.experimental",
)


def _one_error_line(err: str) -> str:
    """The single stderr line of a CLI error (asserts there is exactly one and no traceback)."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _explain(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["explain", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def x4(tmp_path) -> Path:
    path = tmp_path / "x4.pt"
    torch.save(torch.randn(2, 4), path)
    return path


# -- explain ----------------------------------------------------------------------------------------------------------
def test_target_out_of_range(capsys, x4):
    rc, out, err = _explain(capsys, "--model", MLP, "--input", str(x4), "--target", "7")
    line = _one_error_line(err)
    assert rc == 1 and out == ""
    assert line.startswith("dynlrp explain: error: --target 7 out of range") and "0..2" in line


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_target_not_an_integer(capsys, x4, value):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", MLP, "--input", str(x4), "--target", value])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--target" in line and repr(value) in line and "integer" in line and "--help" in line


def test_unknown_preset(capsys, x4):
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(x4), "--rules", "no_such_preset")
    line = _one_error_line(err)
    assert rc == 2
    assert "--rules" in line and "unknown rules preset 'no_such_preset'" in line and "epsilon" in line


def test_input_of_the_wrong_shape(capsys, tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(torch.randn(2, 5), path)
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(path))
    line = _one_error_line(err)  # was 265 lines, 18 of them torch's ERROR log
    assert rc == 1
    assert f"--input {path}" in line and "shape (2, 5)" in line and "mat1 and mat2" in line


def test_input_of_the_wrong_dtype(capsys, tmp_path):
    path = tmp_path / "ints.pt"
    torch.save(torch.arange(8).reshape(2, 4), path)
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(path))
    line = _one_error_line(err)
    assert rc == 1
    assert f"--input {path}" in line and "dtype int64" in line and "floating-point input" in line


def test_garbage_input_file(capsys, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a tensor file \x00\x01\x02")
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(path))
    line = _one_error_line(err)
    assert rc == 2
    assert f"--input {path}" in line and "weights_only=True" in line and "torch.save" in line


class _NotATensor:  # pickled by torch.save below; torch.load(weights_only=True) must refuse it
    pass


def test_unpicklable_input_file(capsys, tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"x": _NotATensor()}, path)
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(path))
    line = _one_error_line(err)
    assert rc == 2
    assert f"--input {path}" in line and "_NotATensor" in line and "weights_only=True" in line


def test_missing_input_file_and_npy_objects(capsys, tmp_path):
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(tmp_path / "nope.pt"))
    assert rc == 2 and "nope.pt: no such file" in _one_error_line(err)
    import numpy as np

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(tmp_path / "obj.npy"))
    assert rc == 2 and "obj.npy" in _one_error_line(err)


def test_output_in_a_missing_directory_is_created(capsys, x4, tmp_path):
    out = tmp_path / "missing" / "dir" / "r.pt"
    rc, text, err = _explain(capsys, "--model", MLP, "--input", str(x4), "--out", str(out))
    assert rc == 0, err
    assert err == "" and f"wrote {out}" in text
    assert set(torch.load(out, weights_only=True)) == {"relevance", "output", "target", "seed", "absorbed"}


def test_output_path_that_cannot_be_created(capsys, x4):
    bad = x4 / "sub" / "r.pt"  # x4 is a file, not a directory
    rc, out, err = _explain(capsys, "--model", MLP, "--input", str(x4), "--out", str(bad))
    line = _one_error_line(err)
    assert rc == 2 and out == ""  # checked before the model is compiled
    assert f"--out {bad}" in line and "is not a directory" in line
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(x4), "--png", str(x4.parent))
    assert rc == 2 and "is a directory" in _one_error_line(err)


def test_debug_shows_the_traceback(capsys, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"garbage")
    assert main(["--debug", "explain", "--model", MLP, "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UnpicklingError" in err
    assert err.splitlines()[-1].startswith(f"dynlrp explain: error: --input {path}")
    # after the command too
    assert main(["explain", "--model", MLP, "--input", str(path), "--debug"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_saying_bug(capsys, monkeypatch, x4):
    from dynlrp_fx.cli import explain

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(explain, "run", boom)
    rc, _, err = _explain(capsys, "--model", MLP, "--input", str(x4))
    line = _one_error_line(err)
    assert rc == 1
    assert "bug in dynlrp-fx" in line and "RuntimeError: boom second line" in line and "--debug" in line
    assert main(["--debug", "explain", "--model", MLP, "--input", str(x4)]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_argparse_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", MLP])
    assert exc.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("dynlrp explain: error:") and "--input" in line and "dynlrp explain --help" in line


# -- export -----------------------------------------------------------------------------------------------------------
def test_export_output_in_a_missing_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["export", "--model", MLP, "--input-shape", "2,4", "-o", str(blocker / "x.pt2")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"dynlrp export: error: -o {blocker / 'x.pt2'}") and "not a directory" in line
    out = tmp_path / "missing" / "dir" / "x.pt2"
    assert main(["export", "--model", MLP, "--input-shape", "2,4", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"wrote {out}" in captured.out and out.is_file()


def test_export_unknown_preset_still_one_line(capsys, tmp_path):
    rc = main(["export", "--model", MLP, "--input-shape", "2,4", "--rules", "nope", "-o", str(tmp_path / "x.pt2")])
    assert rc == 1 and "unknown rules preset 'nope'" in _one_error_line(capsys.readouterr().err)


# -- one_line ---------------------------------------------------------------------------------------------------------
def test_one_line():
    assert one_line(ValueError("first\n\n   second  line\nlast: do this")) == "first second line last: do this"
    assert one_line(KeyError("unknown zoo entry 'x'")) == "unknown zoo entry 'x'"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/a/b")) == "No such file or directory: /a/b"
    long = one_line(ValueError("x" * 2000 + "\nrerun with --fix"))
    assert len(long) <= 800 and long.endswith("... rerun with --fix") and "\n" not in long


# -- torch's logging during tracing -----------------------------------------------------------------------------------
class _DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def _levels() -> dict[str, int]:
    return {
        name: lg.level
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and name.startswith(TORCH_LOGGERS)
    }


def _record_levels_during_export(monkeypatch) -> list[dict[str, int]]:
    seen: list[dict[str, int]] = []
    original = torch.export.export

    def export(*args, **kwargs):
        seen.append(_levels())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return seen


def test_logger_levels_raised_during_export_and_restored(monkeypatch):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    monkeypatch.delenv("DYNLRP_VERBOSE", raising=False)
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    old = shapes.level
    shapes.setLevel(logging.INFO)  # a level set by the user: restored exactly, as is NOTSET elsewhere
    try:
        before = _levels()
        assert before["torch.fx.experimental.symbolic_shapes"] == logging.INFO
        assert logging.NOTSET in before.values()
        seen = _record_levels_during_export(monkeypatch)
        with pytest.raises(dynlrp.DynlrpTraceError, match="data-dependent"):
            dynlrp.compile(_DataDependent(), torch.randn(2, 4))  # the error path
        assert _levels() == before
        dynlrp.compile(covered_model(), torch.randn(2, 4))  # the success path
        assert _levels() == before
        assert seen and all(set(s.values()) == {logging.CRITICAL} for s in seen)
        assert all(s.keys() == before.keys() for s in seen)  # no logger created
    finally:
        shapes.setLevel(old)


@pytest.mark.parametrize("env", [{"DYNLRP_VERBOSE": "1"}, {"TORCH_LOGS": "-dynamo"}])
def test_logs_stay_on_when_asked_for(monkeypatch, env):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    monkeypatch.delenv("DYNLRP_VERBOSE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _levels()
    seen = _record_levels_during_export(monkeypatch)
    dynlrp.compile(covered_model(), torch.randn(2, 4), cache=False)  # the test is about what tracing logs
    assert seen and seen[0] == before and _levels() == before


_SCRIPT = textwrap.dedent(
    """
    import logging
    import torch
    from torch import nn
    import dynlrp_fx as dynlrp

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.lin(x)
            return -self.lin(x)

    def levels():
        return {n: lg.level for n, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}

    before = levels()
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for name, model in (("untraceable", DataDependent()), ("wrong shape", mlp)):
        try:
            dynlrp.compile(model, torch.randn(2, 4 if name == "untraceable" else 5))
        except dynlrp.DynlrpTraceError as e:
            print(f"CAUGHT {name}: {e}")
    after = levels()
    print("LEVELS RESTORED" if all(after[n] == lv for n, lv in before.items()) else f"LEVELS CHANGED {after}")
    """
)


def _run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "untraceable.py"  # a file, so that the error can quote the source line
    script.write_text(_SCRIPT)
    environ = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "DYNLRP_VERBOSE")}
    environ.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


def _torch_log_lines(stderr: str) -> list[str]:
    """Lines of torch's log format (``E1204 19:44:21.202000 PID path:line] ...``, ``W...``)."""
    import re

    return [ln for ln in stderr.splitlines() if re.match(r"[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ", ln)]


def test_untraceable_model_prints_no_torch_error_log(tmp_path):
    proc = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CAUGHT untraceable: torch.export could not trace the model" in proc.stdout
    assert "if x.sum() > 0:" in proc.stdout and "torch.cond" in proc.stdout  # the DynlrpTraceError says what to do
    assert "CAUGHT wrong shape: torch.export could not trace the model" in proc.stdout
    assert "LEVELS RESTORED" in proc.stdout
    assert _torch_log_lines(proc.stderr) == [], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "failed while attempting to run meta" not in proc.stderr
    # the same run with DYNLRP_VERBOSE=1 shows torch's ERROR log: the quiet run above did silence it
    loud = _run_script(tmp_path, DYNLRP_VERBOSE="1")
    assert loud.returncode == 0 and "LEVELS RESTORED" in loud.stdout
    assert any(ln.startswith("E") and "failed while attempting to run meta" in ln for ln in _torch_log_lines(loud.stderr))
