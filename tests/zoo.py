"""The torchvision classification zoo at the smallest inputs each model accepts, with random
weights (no downloads), for the zoo tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

MODELS = torchvision.models.list_models(module=torchvision.models)


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, input batch of 1)`` for a torchvision classification model."""
    kwargs: dict = {}
    size = 64
    if name.startswith("vit_"):
        size = 56 if name == "vit_h_14" else 64
        kwargs["image_size"] = size
    elif name.startswith("maxvit_"):
        size = 224  # every stage must divide by the 7x7 partition
    elif name == "inception_v3":
        size = 96
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    torch.manual_seed(seed)
    with torch.no_grad():
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval(), torch.randn(1, 3, size, size)
