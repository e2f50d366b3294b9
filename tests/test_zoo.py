"""The whole torchvision classification zoo (and a timm sample) through mgicify() with default arguments.

Models are built on the ``meta`` device (no weights allocated, no init cost),
which the compiler handles like any other device; output shapes are compared by
running both graphs on meta tensors. Real-tensor training of the rewritten
networks is covered by ``test_mgicify.py``; here the point is breadth.
"""

import re
import warnings

import pytest
import torch
import torchvision

import mgic_transform as mt
from mgic_transform.nn import MGICBlock
from mgic_transform.passes.shapes import run_meta

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)

# Families whose every model must have blocks rewritten at default settings (the others are
# mostly width-changing: DenseNet, SqueezeNet, GoogLeNet ... report why, block by block).
MUST_REWRITE_FAMILIES = (
    "resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3_large", "efficientnet", "regnet", "mnasnet1",
    "vgg", "convnext", "shufflenet_v2_x(1_5|2_0)", "vit", "swin", "maxvit", "alexnet",
)
MUST_REWRITE = re.compile("^(" + "|".join(MUST_REWRITE_FAMILIES) + ")")


def _meta_model(build):
    try:
        with torch.device("meta"):
            return build(), "meta"
    except NotImplementedError:  # constructors that compute with tensors (RegNet widths)
        return build(), "cpu"


def _check(model, device, size):
    model.eval()
    x = torch.zeros(1, 3, size, size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = mt.mgicify(model, x)
    gm.graph.lint()
    out, ref = run_meta(gm, (x,)), run_meta(torch.fx.symbolic_trace(model), (x,))
    assert tuple(out.shape) == tuple(ref.shape)
    plan = gm.meta["mgic"]
    assert all(d.reason for d in plan.skipped)
    assert len([m for m in gm.modules() if isinstance(m, MGICBlock)]) == len(plan.rewritten)
    assert sum(p.numel() for p in gm.parameters()) <= sum(p.numel() for p in model.parameters())
    return plan


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_zoo(name):
    model, device = _meta_model(lambda: torchvision.models.get_model(name, weights=None))
    plan = _check(model, device, 299 if name == "inception_v3" else 224)
    if MUST_REWRITE.match(name):
        assert plan.rewritten, [(d.path, d.reason) for d in plan.blocks]
    elif not plan.rewritten:  # densenet, squeezenet ...: the report says why, block by block
        assert plan.blocks or plan.notes


def test_zoo_is_the_whole_zoo():
    """The parametrisation holds every classifier torchvision registers, and every family above exists.

    Counted independently of ``list_models(module=...)``: all registered builders
    minus those of the other tasks' subpackages.
    """
    other_tasks = {"detection", "segmentation", "video", "quantization", "optical_flow"}
    classifiers = {name for name in torchvision.models.list_models()
                   if torchvision.models.get_model_builder(name).__module__.split(".")[2] not in other_tasks}
    assert set(TORCHVISION_MODELS) == classifiers and len(classifiers) >= 80
    missing = [f for f in MUST_REWRITE_FAMILIES if not any(re.match(f, name) for name in TORCHVISION_MODELS)]
    assert not missing, f"families named in MUST_REWRITE that the zoo does not have (renamed?): {missing}"

TIMM_MODELS = [
    "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto", "regnety_002", "ghostnet_100",
    "vit_tiny_patch16_224", "mixer_b16_224", "cspresnet50", "res2net50_26w_4s", "poolformer_s12", "repvgg_a0",
    "efficientformer_l1", "seresnext26d_32x4d", "hrnet_w18_small", "dla34",
]


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_zoo(name):
    timm = pytest.importorskip("timm")  # here, not at module level: without timm the torchvision zoo still runs
    model, device = _meta_model(lambda: timm.create_model(name, pretrained=False))
    plan = _check(model, device, 224)
    if name != "dla34":
        assert plan.rewritten, [(d.path, d.reason) for d in plan.blocks]
