"""Each hand-written VJP against torch.autograd, on the shapes and edge cases where a VJP goes wrong: strided
convs that drop rows (output_padding), groups and dilation, max-pool ties and floor mode, residual blocks."""

import pytest
import torch
from torch import nn

from oodguard.export import vjp
from oodguard.export.backbones import BasicBlock


def _autograd(module, x, g):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(x), x, g)
    return grad


def _assert_vjp(module, x):
    module.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        y, back = vjp.taped(module, x)
        expected_y = module(x)
    g = torch.randn_like(y)
    expected = _autograd(module, x, g)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    with torch.no_grad():
        actual = back(g)
    assert actual.shape == x.shape
    scale = expected.abs().max()
    assert scale > 0
    assert float((actual - expected).abs().max() / scale) < 1e-5


def _bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3), bn.weight.uniform_(-2, 2)
    return bn


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(3, 5, 3, padding=1), 8),
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), 9),  # odd input: the last row is not covered (output_padding 0 vs 1)
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), 8),
    (nn.Conv2d(4, 6, 5, stride=3), 13),
    (nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), 7),
    (nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0)), 10),
])
def test_conv2d(conv, size):
    torch.manual_seed(0)
    _assert_vjp(conv, torch.randn(2, conv.in_channels, size, size))


@pytest.mark.parametrize("module", [_bn(4), nn.ReLU(), nn.Identity(), nn.Flatten(), nn.AdaptiveAvgPool2d(1),
                                    nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 3))])
def test_elementwise_pooling_and_linear_layers(module):
    torch.manual_seed(0)
    _assert_vjp(module, torch.randn(3, 4, 5, 5))


@pytest.mark.parametrize("size", [8, 9])  # 9: floor mode drops the last row and column
def test_max_pool_sends_the_gradient_to_the_first_maximum_of_tied_windows(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    x[:, :, :4, :4] = 0.7  # constant region: every 2x2 window there is a four-way tie
    x[0, 0, 4:6, 4:6] = torch.tensor([[0.1, 0.9], [0.9, 0.2]])  # a tie at the second and third positions
    _assert_vjp(nn.MaxPool2d(2), x)
    _assert_vjp(nn.Sequential(nn.ReLU(), nn.MaxPool2d(3)), x)


@pytest.mark.parametrize("in_channels, out_channels, stride", [(8, 8, 1), (8, 16, 2)])  # identity, projection
def test_residual_block(in_channels, out_channels, stride):
    torch.manual_seed(0)
    block = BasicBlock(in_channels, out_channels, stride)
    for bn in (block.bn1, block.bn2, *[m for m in block.shortcut.modules() if isinstance(m, nn.BatchNorm2d)]):
        bn.load_state_dict(_bn(bn.num_features).state_dict())
    _assert_vjp(block, torch.randn(2, in_channels, 8, 8))


@pytest.mark.parametrize("module", [nn.Sigmoid(), nn.MaxPool2d(3, stride=2), nn.Conv2d(1, 1, 3, padding="same"),
                                    nn.BatchNorm2d(2).train()])
def test_a_layer_without_a_vjp_is_refused_by_name(module):
    with pytest.raises(TypeError, match=type(module).__name__):
        vjp.taped(module, torch.randn(1, 2, 6, 6) if not isinstance(module, nn.Conv2d) else torch.randn(1, 1, 6, 6))


def _assert_summed_vjp(stage, x, summed: bool):
    """``vjp.taped_sum`` against autograd summed over the input's positions; ``summed``: whether the stage
    takes the summed path (no full input gradient) or the full VJP's sum."""
    modules = list(stage)
    for m in modules:
        m.eval()
    assert (vjp._summable_prefix(modules) > 0) == summed
    torch.manual_seed(1)
    with torch.no_grad():
        y, back = vjp.taped_sum(modules, x)
        torch.testing.assert_close(y, vjp.run(modules, x), rtol=0, atol=0)
    g = torch.randn_like(y)
    expected = _autograd(nn.Sequential(*modules), x, g).sum(dim=(2, 3))
    with torch.no_grad():
        actual = back(g)
        again = back(g)  # a second call gives the same (the closure keeps no state)
    assert actual.shape == expected.shape
    torch.testing.assert_close(again, actual, rtol=0, atol=0)
    assert float((actual - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("stage, size, summed", [
    ([nn.Conv2d(3, 5, 5), nn.ReLU(), nn.MaxPool2d(2)], 14, True),  # LeNet-5's conv2 stage
    ([nn.Conv2d(3, 5, 3, stride=2), _bn(5), nn.ReLU(), nn.MaxPool2d(2)], 13, True),  # stride drops a row; floor mode
    ([nn.Conv2d(3, 5, 3, dilation=2), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(5, 4, 1)], 12, True),  # ReLU after the pool
    ([nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)], 8, False),  # padding: the full VJP, summed
    ([nn.ReLU(), nn.Conv2d(3, 4, 3)], 8, False),
    ([nn.Conv2d(4, 6, 3, groups=2), nn.ReLU()], 8, False),
])
def test_summed_vjp_equals_autograd_summed(stage, size, summed):
    torch.manual_seed(0)
    x = torch.randn(3, stage[0].in_channels if hasattr(stage[0], "in_channels") else 3, size, size)
    x[0, :, :4, :4] = 0.5  # tied windows
    _assert_summed_vjp(stage, x, summed)
