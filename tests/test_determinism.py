"""Determinism: the same seed gives the same transformed weights.

``torch.manual_seed(s)`` before ``mgicify`` fixes every new weight (block variants,
transfer operators, residual norms); kept layers are exact copies of the input
model's; nothing depends on Python's hash seed, on the values of the example
inputs (only their shapes) or on the input model's train/eval mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mgic_transform as mt
from test_properties import MOBILE_SE, TRANSITION, RandomCNN, cnn_specs, example_input

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SPEC = (2, 3, 32, (("residual", 32, 32, 3, 1, True), ("se", 32, 8, 3), ("invres", 32, 64, 3, True),
                   ("gate", 32, 3), ("concat", 32, 16, 3)), 5)
OPTS = dict(group_size=4, coarsest_width=8)


def _model(spec=SPEC, seed=0):
    torch.manual_seed(seed)
    return RandomCNN(spec)


def _transform(model, seed, x=None, **opts):
    torch.manual_seed(seed)
    return mt.mgicify(model, example_input(SPEC) if x is None else x, **{**OPTS, **opts})


def _state(gm):
    return {k: v.clone() for k, v in gm.state_dict().items()}


def _assert_equal_states(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _mgic_keys(gm):
    return [f"{d.module}.{k}" for d in gm.meta["mgic"].rewritten for k in gm.get_submodule(d.module).state_dict()]


def test_reference_model_rewrites_every_join_kind():
    """Guard: the determinism checks below cover five rewritten blocks of different kinds."""
    gm = _transform(_model(), 0)
    assert [d.path for d in gm.meta["mgic"].rewritten] == ["body.0", "body.1", "body.2", "body.3.conv", "body.4"]


def test_same_seed_same_weights_plan_and_code():
    model = _model()
    a, b = _transform(model, 0), _transform(model, 0)
    _assert_equal_states(a.state_dict(), b.state_dict())
    assert a.meta["mgic"].to_dict() == b.meta["mgic"].to_dict()
    assert a.code == b.code
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    x = example_input(SPEC)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_same_seed_same_weights_after_unrelated_rng_use():
    """Only the seed set right before mgicify matters, not what ran before it."""
    model = _model()
    a = _transform(model, 7)
    torch.randn(1000)  # unrelated use of the global RNG
    _model(seed=3)
    b = _transform(model, 7)
    _assert_equal_states(a.state_dict(), b.state_dict())


def test_different_seeds_change_only_the_new_weights():
    model = _model()
    a, b = _transform(model, 0), _transform(model, 1)
    new = set(_mgic_keys(a))
    assert new and new == set(_mgic_keys(b))
    sa, sb = a.state_dict(), b.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed <= new  # kept layers never depend on the seed ...
    assert any(k.endswith("weight") for k in changed)  # ... new weights do
    # and kept layers are exact copies of the input model's
    ref = model.state_dict()
    for k in sa:
        if k not in new:
            assert torch.equal(sa[k], ref[k]), k


def test_weights_do_not_depend_on_example_input_values():
    model = _model()
    x = example_input(SPEC)
    a = _transform(model, 0, x=x)
    b = _transform(model, 0, x=torch.zeros_like(x))
    c = _transform(model, 0, x=x * 1e3)
    _assert_equal_states(a.state_dict(), b.state_dict())
    _assert_equal_states(a.state_dict(), c.state_dict())


def test_weights_do_not_depend_on_the_training_mode():
    a = _transform(_model().train(), 0)
    b = _transform(_model().eval(), 0)
    _assert_equal_states(a.state_dict(), b.state_dict())
    assert a.training and not b.training


def test_mgicify_does_not_consume_the_input_models_weights():
    """Transforming twice from one model instance equals transforming two identical instances."""
    model = _model()
    a = _transform(model, 0)
    b = _transform(_model(), 0)
    _assert_equal_states(a.state_dict(), b.state_dict())


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cnn_specs(max_blocks=3), group_size=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_same_seed_same_weights_on_random_cnns(spec, group_size, seed):
    torch.manual_seed(0)
    model = RandomCNN(spec)
    x = example_input(spec)
    states = []
    for _ in range(2):
        torch.manual_seed(seed)
        states.append(mt.mgicify(model, x, group_size=group_size, coarsest_width=4, transitions=True).state_dict())
    _assert_equal_states(*states)


# --------------------------------------------------------------------------- across processes


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_determinism import _digests_in_process
    print(json.dumps(_digests_in_process()))
    """
)


def _digests_in_process():
    import hashlib

    out = {}
    for name, spec, opts in [("ref", SPEC, OPTS), ("mobile_se", MOBILE_SE, dict(group_size=7, coarsest_width=4)),
                             ("transition", TRANSITION, dict(group_size=4, coarsest_width=8, transitions=True))]:
        torch.manual_seed(0)
        model = RandomCNN(spec)
        torch.manual_seed(1)
        gm = mt.mgicify(model, example_input(spec), **opts)
        sd = gm.state_dict()
        out[name] = {
            "keys": list(sd),
            "digest": hashlib.sha256(b"".join(sd[k].cpu().contiguous().numpy().tobytes() for k in sd)).hexdigest(),
            "plan": json.loads(json.dumps(gm.meta["mgic"].to_dict())),
            "code": gm.code,
        }
    return out


@pytest.mark.slow
def test_same_seed_same_weights_across_processes_and_hash_seeds():
    tests_dir = str(Path(__file__).resolve().parent)
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, tests_dir], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    here = _digests_in_process()
    assert runs[0] == runs[1] == here
    assert all(here[name]["plan"]["blocks"] for name in here)
