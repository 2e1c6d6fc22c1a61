"""The independent reference for per-layer gradients: torch.autograd.grad through the PyTorch module's own
forward pass, with hooks on its own submodules (not on ``sisom_stages``), for LeNet-5 and the CIFAR ResNet-18."""

import torch

from oodguard.export.backbones import LeNet5


def _hooked(classifier):
    """Each SISOM layer's submodule in the module's own structure (the output it marks)."""
    b = classifier.backbone
    if isinstance(b, LeNet5):
        return {"conv1": b.conv[2], "conv2": b.conv[5], "fc1": b.fc[2], "penultimate": b.fc[4]}
    return {"layer1": b.stages[0], "layer2": b.stages[1], "layer3": b.stages[2], "penultimate": b.flatten}


def autograd_reference(classifier, x):
    """``{layer: (mean_hw A, mean_hw dL/dA, mean_hw |dL/dA|)}`` by torch.autograd.grad through ``classifier(x)``,
    with ``L`` the summed cross-entropy to the uniform target."""
    captured = {}
    handles = [module.register_forward_hook(lambda m, i, out, name=name: captured.__setitem__(name, out))
               for name, module in _hooked(classifier).items()]
    try:
        logits = classifier(x)
    finally:
        for handle in handles:
            handle.remove()
    loss = (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).sum()
    grads = torch.autograd.grad(loss, list(captured.values()))
    pool = lambda t: t.mean(dim=(2, 3)) if t.ndim == 4 else t  # noqa: E731
    return {name: (pool(captured[name]).detach(), pool(g), pool(g.abs())) for name, g in zip(captured, grads)}
