"""fold_batchnorm: same outputs in eval mode, BatchNorms gone, input untouched."""


import pytest
import torch
import torchvision
from torch import nn

import mgic_transform as mt
from custom_models import CUSTOM_MODELS


def _count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobile_se", "pointnet", "residual_mlp"])
def test_fold_batchnorm_keeps_outputs(name):
    torch.manual_seed(0)
    if name == "resnet18":
        model, x, sg, sc = torchvision.models.resnet18(), torch.randn(2, 3, 64, 64), 32, 64
    else:
        ctor, shape, sg, sc = CUSTOM_MODELS[name]
        model, x = ctor(), torch.randn(*shape)
    gm = mt.mgicify(model, x, group_size=sg, coarsest_width=sc)
    with torch.no_grad():  # N_j starts at weight 0 (corrections off): switch them on, so folding N_j into P_j counts
        for block in gm.modules():
            if isinstance(block, mt.MGICBlock):
                for n in block.norms:
                    n.weight.uniform_(0.5, 1.5)
                    n.bias.uniform_(-0.5, 0.5)
    gm.train()
    for _ in range(2):  # give the BatchNorms non-trivial running statistics
        gm(x)
    gm.eval()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    folded = mt.fold_batchnorm(gm)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # input untouched
    if name != "residual_mlp":  # channels-last Linear blocks have no conv -> bn pairs
        assert _count_bn(folded) < _count_bn(gm)
    folded_blocks = [m for m in folded.modules() if isinstance(m, mt.MGICBlock)]
    assert len(folded_blocks) == len(gm.meta["mgic"].rewritten)


def test_fold_batchnorm_of_a_plain_model_traces_it_first():
    """The original network folds too (the fair baseline for a folded MGIC network), keeping `+=` in place."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    folded = mt.fold_batchnorm(model)
    assert isinstance(folded, torch.fx.GraphModule) and _count_bn(folded) == 0
    assert "+=" in folded.code
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert isinstance(model.layer1[0], nn.Module) and _count_bn(model) == 20  # the input model is untouched


def test_fold_batchnorm_of_an_untraceable_model_says_why():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.bn(self.conv(x))
            return x

    with pytest.raises(mt.MGICError, match="leaf"):
        mt.fold_batchnorm(Untraceable())
