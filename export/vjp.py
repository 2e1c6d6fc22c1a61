"""Hand-written vector-Jacobian products (VJPs) of the layers backbones are built from, exportable to ONNX.

Multi-layer SISOM needs ``dL/dA`` for activations ``A`` inside the backbone, *inside the exported graph*.
``torch.autograd.grad`` and ``torch.func.vjp`` do not export with ``torch.onnx.export(..., dynamo=True)``;
the VJPs here are plain tensor code, so they do. :func:`taped` runs a module forward (the same calls as its
``forward``, so the same values) and returns its output with a function mapping the gradient w.r.t. that
output to the gradient w.r.t. its input. Eval mode throughout (BatchNorm uses its running statistics).

- ``Conv2d``: ``conv_transpose2d`` with the same weight, stride, padding, dilation and groups;
  ``output_padding`` restores the input's size (a strided conv drops the last rows it cannot cover).
- ``BatchNorm2d`` (eval): the per-channel scale ``weight / sqrt(running_var + eps)``.
- ``ReLU``: the mask ``input > 0`` (autograd's convention: no gradient at 0).
- ``MaxPool2d`` with ``kernel_size == stride``, no padding or dilation: each window's gradient goes to its
  *first* maximum in row-major order, as PyTorch's kernel does. Ties are common (constant backgrounds give
  equal positive activations), so a mask ``input == upsampled max`` would be wrong; the windows are
  reshaped, ``argmax``-ed (first maximum, in PyTorch and ONNX alike) and one-hot expanded instead.
- ``AdaptiveAvgPool2d`` to 1x1: broadcast divided by ``h * w``. ``Flatten``: reshape. ``Linear``:
  ``grad @ W``. ``Identity``. ``Sequential`` or a list of modules: the chain, backwards.
- Any other module that implements ``taped(x) -> (output, vjp)`` (a residual block: see
  :class:`oodguard.export.backbones.BasicBlock`).

Anything else raises :class:`TypeError` naming the module.

:func:`taped_sum` is the VJP summed over the input's spatial positions (``[B, C]``), which is all multi-layer
SISOM needs of its earliest layer. Summing lets the spatial routing go: a max-pool's VJP only moves each
window's gradient within the window, so it keeps the sum; a zero-padded conv's transpose spreads every
output gradient over a whole kernel inside the input, so ``sum dL/dx = (sum dL/dy) @ sum_k W``; an eval
BatchNorm scales each channel. A ReLU needs the positions, except right before a max-pool: the gradient then
reaches only each window's first maximum, whose ReLU passes it exactly when the pooled output is positive, so
the pair's summed VJP is ``sum (dL/dy * (y > 0))``. A stage that starts with such modules (LeNet-5's ``conv2``:
conv, ReLU, max-pool) needs no ConvTranspose and no un-pooling for its input's pooled gradient; any other
stage takes the full VJP and sums it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

VJP = Callable[[torch.Tensor], torch.Tensor]
Stage = nn.Module | Sequence[nn.Module]  # a list: its modules applied in order


def run(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    """A stage's forward pass alone (no tape)."""
    for module in stage if isinstance(stage, Sequence) else (stage,):
        x = module(x)
    return x


def taped(module: Stage, x: torch.Tensor) -> tuple[torch.Tensor, VJP]:
    """``(module(x), vjp)`` with ``vjp(dL/d output) = dL/d x``."""
    if isinstance(module, Sequence):
        return chain(module, x)
    if hasattr(module, "taped"):
        return module.taped(x)
    if isinstance(module, nn.Sequential):
        return chain(list(module), x)
    y = module(x)
    if isinstance(module, nn.Identity):
        return y, lambda g: g
    if isinstance(module, nn.ReLU):
        return y, lambda g: g * (x > 0).to(g.dtype)
    if isinstance(module, nn.Flatten):
        return y, lambda g: g.reshape(x.shape)
    if isinstance(module, nn.Linear):
        return y, lambda g: g @ module.weight
    if isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats:
        scale = (module.weight / torch.sqrt(module.running_var + module.eps)).reshape(1, -1, 1, 1)
        return y, lambda g: g * scale
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return y, lambda g: _conv2d_vjp(module, x.shape, g)
    if isinstance(module, nn.AdaptiveAvgPool2d) and _pair(module.output_size) == (1, 1):
        h, w = x.shape[-2:]
        return y, lambda g: g.reshape(*g.shape[:2], 1, 1).expand(x.shape) / (h * w)
    if isinstance(module, nn.MaxPool2d) and _simple_pool(module):
        return y, lambda g: _max_pool_vjp(_pair(module.kernel_size), x, g)
    raise TypeError(f"no hand-written VJP for {type(module).__name__} ({module}); implement taped(x) on it")


def taped_sum(module: Stage, x: torch.Tensor) -> tuple[torch.Tensor, VJP]:
    """``(module(x), vjp_sum)`` with ``vjp_sum(dL/d output) = dL/dx`` summed over the spatial axes of ``x``
    (``[B, C]``; see the module docstring). ``x`` must be ``[B, C, H, W]``."""
    modules = list(module) if isinstance(module, (Sequence, nn.Sequential)) else [module]
    split = _summable_prefix(modules)
    if split == 0:
        y, back = taped(module, x)
        return y, lambda g: back(g).sum(dim=(2, 3))
    h, summed = x, []
    for m in modules[:split]:
        h = m(h)
        summed.append((m, h))
    y, back_rest = chain(modules[split:], h)

    def vjp_sum(g: torch.Tensor) -> torch.Tensor:
        g = back_rest(g)  # the full gradient at the output of the summed prefix
        total, i = None, len(summed) - 1
        if isinstance(summed[i][0], nn.MaxPool2d) and i > 0 and isinstance(summed[i - 1][0], nn.ReLU):
            total, i = (g * (summed[i][1] > 0).to(g.dtype)).sum(dim=(2, 3)), i - 2  # the ReLU-max-pool pair
        else:
            total = g.sum(dim=(2, 3))
        for m, _ in reversed(summed[: i + 1]):
            if isinstance(m, (nn.MaxPool2d, nn.Identity)):
                continue
            if isinstance(m, nn.BatchNorm2d):
                total = total * (m.weight / torch.sqrt(m.running_var + m.eps))
            else:  # zero-padded Conv2d, groups 1
                total = total @ m.weight.sum(dim=(2, 3))
        return total

    return y, vjp_sum


def _summable_prefix(modules: list[nn.Module]) -> int:
    """How many leading modules :func:`taped_sum` can sum through: zero-padded convs (groups 1), eval
    BatchNorms, identities and simple max-pools, ending at the latest at a ReLU directly followed by a simple
    max-pool (the pair needs the full gradient at its output)."""
    count = 0
    while count < len(modules):
        m = modules[count]
        if (isinstance(m, nn.ReLU) and count + 1 < len(modules) and isinstance(modules[count + 1], nn.MaxPool2d)
                and _simple_pool(modules[count + 1])):
            return count + 2
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and _pair(m.padding) == (0, 0) and m.groups == 1:
            count += 1
        elif isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats:
            count += 1
        elif isinstance(m, nn.Identity) or (isinstance(m, nn.MaxPool2d) and _simple_pool(m)):
            count += 1
        else:
            break
    return count


def chain(modules: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, VJP]:
    """The modules applied in order, and the VJP of the composition."""
    backs = []
    for module in modules:
        x, back = taped(module, x)
        backs.append(back)

    def vjp(g: torch.Tensor) -> torch.Tensor:
        for back in reversed(backs):
            g = back(g)
        return g

    return x, vjp


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv2d_vjp(conv: nn.Conv2d, input_shape: torch.Size, g: torch.Tensor) -> torch.Tensor:
    stride, padding, dilation, kernel = (_pair(v) for v in (conv.stride, conv.padding, conv.dilation, conv.kernel_size))
    out_hw = g.shape[-2:]
    output_padding = tuple(
        input_shape[2 + i] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(g, conv.weight, stride=stride, padding=padding, output_padding=output_padding,
                              groups=conv.groups, dilation=dilation)


def _simple_pool(pool: nn.MaxPool2d) -> bool:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (_pair(pool.kernel_size) == _pair(stride) and _pair(pool.padding) == (0, 0)
            and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices)


def _max_pool_vjp(kernel: tuple[int, int], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient to the first maximum (row-major) of each non-overlapping ``kernel`` window; rows and columns
    the pooling dropped (floor mode) get 0."""
    kh, kw = kernel
    b, c, h, w = x.shape
    oh, ow = h // kh, w // kw
    windows = x[:, :, : oh * kh, : ow * kw].reshape(b, c, oh, kh, ow, kw).permute(0, 1, 2, 4, 3, 5)
    first = windows.reshape(b, c, oh, ow, kh * kw).argmax(dim=-1, keepdim=True)
    one_hot = (first == torch.arange(kh * kw, device=x.device)).to(g.dtype)
    spread = (one_hot * g.unsqueeze(-1)).reshape(b, c, oh, ow, kh, kw).permute(0, 1, 2, 4, 3, 5)
    spread = spread.reshape(b, c, oh * kh, ow * kw)
    return F.pad(spread, (0, w - ow * kw, 0, h - oh * kh))
