"""Tests of the ``mgic-transform`` command: the installed console script, run in a subprocess.

Good inputs must write the model and both reports and print the table; the saved
model must give the same outputs when reloaded in a fresh process. Every bad input
must end with the documented exit status (2 usage/input, 1 cannot transform) and
exactly one line on stderr, without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mgic_transform.nn import MGICBlock

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "tiny_resnet.py"
SMALL = ["--input-shape", "1,3,16,16", "--group-size", "16"]


def _command() -> list[str]:
    """The console script of this environment, else ``python -m mgic_transform.cli``."""
    script = Path(sys.executable).with_name("mgic-transform")
    if script.exists():
        return [str(script)]
    found = shutil.which("mgic-transform")
    return [found] if found else [sys.executable, "-m", "mgic_transform.cli"]


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings must not leak onto stderr either
    return subprocess.run([*_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


PROGRESS = re.compile(r".+\.\.\. (\d+\.\ds|failed)$")  # "counting parameters and FLOPs... 1.3s"


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """The error is one line, the last; before it only progress lines of steps that took over a second."""
    *before, last = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert all(PROGRESS.fullmatch(line) for line in before), proc.stderr
    assert "Traceback" not in proc.stderr
    assert last.startswith("mgic-transform: error: ")
    for needle in needles:
        assert needle in last, last


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# --------------------------------------------------------------------------- errors, no model needed

def run_main(*args, cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``main()`` in this process: the same checks as :func:`run_cli`, without a Python start-up each."""
    from mgic_transform.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the model file's folder on sys.path
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits on its own
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


# (model file name and source or None, arguments after it, text the error line must contain)
BAD_INPUTS = {
    "syntax-error": (("broken.py", "import torch\ndef f(:\n    pass\n"), [], "broken.py:2: syntax error"),
    "file-raises": (("raises.py", "import torch\nx = 1\nraise RuntimeError('boom')\n"), [], "raises.py:3:"),
    "no-model": (("empty.py", "import torch\nVALUE = 3\n"), [], "no model found"),
    "class-needs-args": (
        ("needs_args.py", "from torch import nn\nclass Net(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n"),
        [], "Net(width)",
    ),
    "two-classes": (
        ("two.py", "from torch import nn\nclass A(nn.Module):\n    pass\nclass B(nn.Module):\n    pass\n"),
        [], "class A(), class B()",
    ),
    "model-not-a-module": (("bad_model.py", "model = 42\n"), [], "not an nn.Module"),
    "missing-file": (None, ["missing.py"], "no such file"),
    "bad-import": (None, ["no_such_package_xyz.model"], "cannot import"),
    "bad-attribute": (None, ["torchvision.models.no_such_model"], "has no attribute"),
    "zero-group-size": (None, [TINY, "--group-size", "0"], "--group-size"),
    "non-number": (None, [TINY, "--coarsest-width", "many"], "--coarsest-width"),
    "bad-shape": (None, [TINY, "--input-shape", "1,3,x"], "bad input shape"),
    "bad-format": (None, [TINY, "--format", "yaml"], "--format"),
    "entry-needs-args": (None, [TINY, "--entry", "Block"], "needs arguments (c)"),
    "entry-missing": (None, [TINY, "--entry", "nothing_here"], "TinyResNet"),
    "no-model-arg": (None, [], "MODEL"),
}
# these run through the installed console script; the rest through main() in this process
VIA_SCRIPT = {"syntax-error", "no-model", "missing-file", "zero-group-size", "bad-shape"}


def _bad_input_args(tmp_path: Path, case: str) -> list:
    file, args, _ = BAD_INPUTS[case]
    return ([write(tmp_path, *file)] if file else []) + args


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(VIA_SCRIPT))
def test_bad_inputs_script(tmp_path, case):
    proc = run_cli(*_bad_input_args(tmp_path, case), cwd=tmp_path)
    assert_one_line_error(proc, 2, BAD_INPUTS[case][2])
    assert not (tmp_path / "mgic_out").exists()


@pytest.mark.parametrize("case", sorted(set(BAD_INPUTS) - VIA_SCRIPT))
def test_bad_inputs_main(tmp_path, case, monkeypatch, capsys):
    proc = run_main(*_bad_input_args(tmp_path, case), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 2, BAD_INPUTS[case][2])
    assert not (tmp_path / "mgic_out").exists()


# --------------------------------------------------------------------------- the whole pipeline


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One successful run on the tiny fixture model, shared by the tests below."""
    out = tmp_path_factory.mktemp("out")
    proc = run_cli(TINY, *SMALL, "--output-dir", out, "--format", "json", "--progress", cwd=out)
    return proc, out


@pytest.mark.slow
def test_good_run_writes_outputs(converted):
    proc, out = converted
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    files = {p.name for p in out.iterdir()}
    assert {"tiny_resnet_mgic.pt", "tiny_resnet_mgic_report.json", "tiny_resnet_mgic_report.md"} <= files
    printed = json.loads(proc.stdout)  # --format json prints exactly the report
    saved = json.loads((out / "tiny_resnet_mgic_report.json").read_text())
    assert printed == saved
    assert saved["input_shapes"] == [[1, 3, 16, 16]] and saved["options"]["group_size"] == 16
    assert any(b["status"] == "rewritten" for b in saved["blocks"])
    assert "| block |" in (out / "tiny_resnet_mgic_report.md").read_text()
    *progress, wrote = proc.stderr.strip().splitlines()
    assert wrote.startswith("wrote ") and all(PROGRESS.fullmatch(line) for line in progress), proc.stderr


def test_progress_lines_show_steps_that_take_a_while(capsys):
    from mgic_transform.cli import _Progress

    import time as _time

    with _Progress(True, after=0.05).step("slow step"):
        _time.sleep(0.3)
    with _Progress(True, after=5.0).step("quick step"):
        pass
    with pytest.raises(RuntimeError), _Progress(True, after=0.05).step("failing step"):
        _time.sleep(0.3)
        raise RuntimeError("boom")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and PROGRESS.fullmatch(err[0]) and err[0].startswith("slow step... ")
    assert err[1] == "failing step... failed"  # a quick step says nothing, so its error stays one line


RELOAD = """
import sys, torch
torch.manual_seed(0)
gm = torch.load(sys.argv[1], weights_only=False).eval()
x = torch.randn(1, 3, 16, 16)
with torch.no_grad():
    y = gm(x)
torch.save({"y": y, "params": sum(p.numel() for p in gm.parameters())}, sys.argv[2])
"""


@pytest.mark.slow
def test_saved_model_reloads_in_a_fresh_process(converted, tmp_path):
    """A fresh process loads the .pt and computes what it computes here; parameters as reported."""
    import torch

    _, out = converted
    saved = out / "tiny_resnet_mgic.pt"
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(saved), str(tmp_path / "y.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fresh = torch.load(tmp_path / "y.pt")
    gm = torch.load(saved, weights_only=False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        here = gm(torch.randn(1, 3, 16, 16))
    report = json.loads((out / "tiny_resnet_mgic_report.json").read_text())
    assert fresh["params"] == sum(p.numel() for p in gm.parameters()) == report["params_after"]
    assert fresh["y"].shape == (1, 10)
    torch.testing.assert_close(fresh["y"], here)


@pytest.mark.slow
def test_saved_model_matches_in_memory_model(tmp_path):
    """What the CLI saves computes what ``mgicify`` returned: save here, reload in a fresh process."""
    import torch

    import mgic_transform as mt
    from mgic_transform.cli import load_model

    model = load_model(str(TINY))
    gm = mt.mgicify(model, torch.randn(1, 3, 16, 16), group_size=16).eval()
    torch.save(gm, tmp_path / "m.pt")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = gm(x)
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "m.pt"), str(tmp_path / "y.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt")["y"], expected)


@pytest.mark.slow
def test_existing_outputs_need_force(converted):
    _, out = converted
    before = (out / "tiny_resnet_mgic.pt").stat().st_mtime_ns
    proc = run_cli(TINY, *SMALL, "--output-dir", out, cwd=out)
    assert_one_line_error(proc, 2, "--force", "already exists")
    assert (out / "tiny_resnet_mgic.pt").stat().st_mtime_ns == before
    proc = run_cli(TINY, *SMALL, "--output-dir", out, "--force", "--format", "markdown", cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# MGIC comparison")
    assert (out / "tiny_resnet_mgic.pt").stat().st_mtime_ns != before


@pytest.mark.slow
def test_text_table_and_default_output_dir(tmp_path):
    source = """
        from torch import nn
        def build_model():
            return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
    """
    path = write(tmp_path, "plain.py", source)
    proc = run_cli(path, "--input-shape", "1,3,8,8", "--group-size", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "FLOPs" in proc.stdout and "multiply-add" in proc.stdout
    assert (tmp_path / "mgic_out" / "plain_mgic.pt").exists()
    report = json.loads((tmp_path / "mgic_out" / "plain_mgic_report.json").read_text())
    assert report["options"]["group_size"] == 8


# --------------------------------------------------------------------------- models that cannot be transformed


@pytest.mark.slow
def test_untraceable_model_exits_1(tmp_path):
    source = """
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 64, 3, padding=1)
            def forward(self, x):
                if x.sum() > 0:          # data-dependent control flow: torch.fx cannot trace it
                    return self.conv(x)
                return x
    """
    path = write(tmp_path, "untraceable.py", source)
    assert_one_line_error(run_cli(path, "--input-shape", "1,3,8,8", cwd=tmp_path), 1, "cannot transform")


@pytest.mark.slow
def test_input_shape_the_model_rejects(tmp_path):
    assert_one_line_error(run_cli(TINY, "--input-shape", "1,5,16,16", cwd=tmp_path), 2, "input")


# --------------------------------------------------------------------------- options, in this process


def test_options_reach_the_compiler(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    proc = run_main(TINY, *SMALL, "--coarsest-width", "32", "--transitions", "--skip", "layer2", "--skip", "no_such_block",
                    "--rule", "compact", "--init", "inherit", "--checkpoint", "--output-dir", out, "--format", "json",
                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["options"] == {"rule": "compact", "budget": None, "target_params": None, "target_flops": None,
                                 "group_size": 16, "coarsest_width": 32, "transitions": True, "leaf_modules": [],
                                 "concrete_args": {}, "skip": ["layer2", "no_such_block"], "init": "inherit",
                                 "checkpoint": True, "block_sizes": {}, "calibration_steps": None}
    saved = torch.load(out / "tiny_resnet_mgic.pt", weights_only=False)
    blocks = [m for m in saved.modules() if isinstance(m, MGICBlock)]
    assert blocks and all(m.checkpoint for m in blocks)  # --checkpoint reached every block
    # --init inherit: R averages pairs of channels and P copies back (scratch init draws them at random)
    assert set(blocks[0].restrict[0].weight.unique().tolist()) == {0.0, 0.5}
    assert set(blocks[0].prolong[0].weight.unique().tolist()) == {0.0, 1.0}
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning_lines) == 2 and "no_such_block" in warning_lines[0]  # the compiler's warnings, one line each
    assert "nothing trained to inherit" in warning_lines[1]  # the fixture's weights are freshly initialised
    rows = {b["path"]: b for b in report["blocks"]}
    assert rows["layer2"]["status"] == "skipped" and rows["layer2"]["reason"]
    assert rows["layer1"]["status"] == "rewritten" and rows["layer1"]["levels"][-1] <= 32
    assert any(b["kind"] == "transition" and b["status"] == "rewritten" for b in report["blocks"])
    assert json.loads((out / "tiny_resnet_mgic_report.json").read_text()) == report


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, "raises.py", "raise RuntimeError('boom')\n")
    quiet = run_main(path, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    loud = run_main(path, "--debug", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


# --------------------------------------------------------------------------- B38: CLI abuse


@pytest.mark.parametrize("code, needle", [("0", "called sys.exit(0)"), ("'bye'", "called sys.exit('bye')")])
def test_regression_model_file_that_exits_is_an_error(tmp_path, monkeypatch, capsys, code, needle):
    path = write(tmp_path, "exits.py", f"import sys\nfrom torch import nn\nmodel = nn.Conv2d(3, 3, 1)\nsys.exit({code})\n")
    proc = run_main(path, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 2, needle, "exits.py:4")
    assert not (tmp_path / "mgic_out").exists()


def test_regression_huge_input_shape_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    proc = run_main(TINY, "--input-shape", "99999999999,3,32,32", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 2, "cannot allocate an example input of shape 99999999999,3,32,32")


def test_regression_json_stdout_is_json_even_when_the_model_prints(tmp_path, monkeypatch, capsys):
    source = TINY.read_text() + "\nprint('loading my model')\n"
    path = write(tmp_path, "chatty.py", source)
    proc = run_main(path, *SMALL, "--format", "json", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params_before"] > 0
    assert "loading my model" in proc.stderr


_UNTRACEABLE = """
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.gate = Gate()

    def forward(self, x):
        x = self.gate(self.stem(x))
        return x + self.conv(x)
"""


@pytest.mark.parametrize("leaf", ["Gate", "gate", "g*"])
def test_leaf_module_option_follows_the_trace_hint(tmp_path, monkeypatch, capsys, leaf):
    path = write(tmp_path, "gated.py", _UNTRACEABLE)
    args = ["--entry", "Net", "--input-shape", "1,3,8,8", "--group-size", "8"]
    proc = run_main(path, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 1, "leaf_modules=[...]", "--leaf-module PATTERN")
    proc = run_main(path, *args, "--leaf-module", leaf, "--format", "json", cwd=tmp_path, monkeypatch=monkeypatch,
                    capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert [b["path"] for b in json.loads(proc.stdout)["blocks"] if b["status"] == "rewritten"] == ["conv"]


def test_leaf_module_that_matches_nothing(tmp_path, monkeypatch, capsys):
    proc = run_main(TINY, *SMALL, "--leaf-module", "nothing.here", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 2, "--leaf-module 'nothing.here' names no class")


def test_regression_unsaveable_model_is_a_one_line_error_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    source = TINY.read_text() + "\ndef build_model():\n    m = TinyResNet()\n    m.stem[0].note = lambda: 1  # a kept layer\n    return m\n"
    path = write(tmp_path, "lambda_attr.py", source)
    proc = run_main(path, *SMALL, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(proc, 2, "cannot save the transformed model")
    assert not (tmp_path / "mgic_out").exists()


def test_calibrate_and_export_write_a_fitted_network_and_hand_it_to_export_pt2(tmp_path, monkeypatch, capsys):
    """``--calibrate FILE`` fits every block (the report shows its error before -> after); ``--export`` hands the
    saved network and its example input to ``export_pt2`` for ``DIR/<name>_mgic.pt2`` (which ``tests/test_deploy.py``
    builds and loads in a fresh process; here its call is recorded, to spare a minute of compiling)."""
    import mgic_transform.deploy as deploy

    calls = []
    monkeypatch.setattr(deploy, "export_pt2", lambda gm, inputs, path: calls.append((gm, inputs, path)) or path)
    torch.save((torch.randn(32, 3, 16, 16), torch.zeros(32, dtype=torch.long)), tmp_path / "calib.pt")
    out = tmp_path / "o"
    proc = run_main(TINY, "--input-shape", "1,3,16,16", "--group-size", "4", "--coarsest-width", "8",
                    "--calibrate", tmp_path / "calib.pt", "--calibration-steps", "5", "--export",
                    "--output-dir", out, "--format", "json", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["options"]["init"] == "calibrate" and report["options"]["calibration_steps"] == 5
    fits = [b["fit"] for b in report["blocks"] if b["status"] == "rewritten"]
    assert fits and all(f["steps"] == 5 and f["error_after"] < f["error_before"] for f in fits)
    ((gm, inputs, path),) = calls
    assert path == out / "tiny_resnet_mgic.pt2" and tuple(inputs[0].shape) == (1, 3, 16, 16)
    saved = torch.load(out / "tiny_resnet_mgic.pt", weights_only=False)
    assert saved.state_dict().keys() == gm.state_dict().keys()
