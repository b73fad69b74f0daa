"""Weight sets (shapes only) and the real models of the end-to-end benchmark.

A weight set is a list of weight shapes; 4-D shapes become Conv2d weights, 2-D shapes Linear weights, because
both schedulers find their candidates by module type. Modules are created on the meta device and then given
Parameters that alias shared "master" tensors, so several contenders can hold the same data without copies.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Shape = Tuple[int, ...]

# A 64x64 stem that stands in for the embedding / first layer: rigl's uniform rule keeps the first candidate
# dense, and in the real models that is a small layer, so every layer of interest below stays sparse.
STEM: Shape = (64, 64)


def resnet50_shapes() -> List[Shape]:
    """torchvision resnet50's 53 conv weights and its fc weight, in named_modules() order (25,502,912)."""
    shapes: List[Shape] = [(64, 3, 7, 7)]
    c_in = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        out = width * 4
        for b in range(blocks):
            shapes += [(width, c_in, 1, 1), (width, width, 3, 3), (out, width, 1, 1)]
            if b == 0:
                shapes.append((out, c_in, 1, 1))  # downsample.0 comes after conv3 in torchvision
            c_in = out
    shapes.append((1000, 2048))
    return shapes


def gpt_shapes(d: int, n_layers: int) -> List[Shape]:
    """GPT-style block Linears (c_attn, attn c_proj, c_fc, mlp c_proj) as (out, in), after the stem."""
    block = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    return [STEM] + block * n_layers


def stack_shapes(n_layers: int, d: int = 1024) -> List[Shape]:
    return [STEM] + [(d, d)] * n_layers


LLM_MLP: List[Shape] = [(11008, 4096)]  # one LLaMA-7B MLP projection; alone, so it is sparse

WEIGHT_SETS = {
    "resnet50": resnet50_shapes,
    "gpt2-small": lambda: gpt_shapes(768, 12),           # 84.9M in the 48 block Linears
    "llm-4096x11008": lambda: list(LLM_MLP),               # 45.1M
    "gpt-1.3b": lambda: gpt_shapes(2048, 26),              # 1.31B, GPT-3 XL widths
    # --quick: tiny sets with the same structure, for the smoke test
    "tiny-cnn": lambda: [(8, 3, 3, 3), (16, 8, 3, 3), (32, 16, 3, 3), (32, 32, 1, 1), (10, 32)],
    "tiny-mlp": lambda: gpt_shapes(32, 2),
}

RESNET50_WEIGHTS = 25_502_912


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_module(shapes: Sequence[Shape], weights: Sequence[torch.Tensor]) -> nn.Module:
    """A flat container of Conv2d/Linear modules whose weights are Parameters aliasing `weights`."""
    layers = nn.ModuleList()
    with torch.device("meta"):
        for s in shapes:
            if len(s) == 4:
                layers.append(nn.Conv2d(s[1], s[0], (s[2], s[3]), bias=False))
            elif len(s) == 2:
                layers.append(nn.Linear(s[1], s[0], bias=False))
            else:
                raise ValueError(f"unsupported weight shape {s}")
    for layer, w in zip(layers, weights):
        layer.weight = nn.Parameter(w)  # shares w's storage
    container = nn.Module()
    container.layers = layers
    return container


# ---------------------------------------------------------------------------------------------- real models
# torchvision's ResNet structure and module names, for machines where torchvision does not import; the
# parameter shapes are identical (checked by tests/test_bench.py against the weight-set shapes).
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, base=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        c_in = base
        for i, n in enumerate(layers):
            width = base * 2 ** i
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != width * block.expansion:
                down = nn.Sequential(nn.Conv2d(c_in, width * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(width * block.expansion))
            blocks = [block(c_in, width, stride, down)]
            c_in = width * block.expansion
            blocks += [block(c_in, width) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet(name: str, base: int = 64, num_classes: int = 1000) -> Tuple[nn.Module, str]:
    """(model, source): torchvision's model when it imports (and base is the standard 64), else ours."""
    if base == 64:
        try:
            import torchvision.models as tvm
            return getattr(tvm, name)(num_classes=num_classes), "torchvision"
        except Exception:
            pass
    spec = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[name]
    return ResNet(*spec, num_classes=num_classes, base=base), "bench (torchvision shapes)"
