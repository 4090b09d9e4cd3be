"""Tiny seeded models for tests, built in code; factories take no arguments."""

import torch
from torch import nn


def _seeded(module: nn.Module) -> nn.Module:
    return module.eval()


def mlp() -> nn.Module:
    """A three-layer perceptron on 1x16 inputs."""
    torch.manual_seed(0)
    return _seeded(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))


def conv_stack() -> nn.Module:
    """Conv / BN / ReLU / pool chain on 1x3x32x32 inputs."""
    torch.manual_seed(0)
    return _seeded(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
    )


class Residual(nn.Module):
    """A residual block: the skip path crosses any cut placed inside the block."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


def residual() -> nn.Module:
    """A residual block on 1x8x16x16 inputs."""
    torch.manual_seed(0)
    return _seeded(Residual())


class Branches(nn.Module):
    """Two parallel branches ending in a concat."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


def branches() -> nn.Module:
    """Parallel branches joined by a concat, on 1x4x16x16 inputs."""
    torch.manual_seed(0)
    return _seeded(Branches())


class SqueezeExcite(nn.Module):
    """conv -> relu -> (x * se(x)) -> conv -> + relu output: the broadcast multiply is not
    spatially local, so it breaks a tiling run, and the add joins the second run."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        return self.conv2(a * torch.sigmoid(self.fc(self.pool(a)))) + a


def squeeze_excite() -> nn.Module:
    """Inputs 1x4xHxW."""
    torch.manual_seed(0)
    return _seeded(SqueezeExcite())


class TwoInputs(nn.Module):
    """A model with two inputs: an image and a feature vector."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 + 5, 2)

    def forward(self, image, extra):
        pooled = self.conv(image).mean(dim=(2, 3))
        return self.fc(torch.cat([pooled, extra], dim=1))


def two_inputs() -> nn.Module:
    """Inputs 1x3x8x8 and 1x5."""
    torch.manual_seed(0)
    return _seeded(TwoInputs())


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.fc(x).sum(dim=0, keepdim=True)
        return self.fc(x)


def shape_branch() -> nn.Module:
    """Inputs 2x8."""
    torch.manual_seed(0)
    return _seeded(ShapeBranch())


class ValueBranch(nn.Module):
    """Control flow on a tensor's value: neither tracer can handle it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def value_branch() -> nn.Module:
    """Inputs 1x4."""
    return ValueBranch()


class Sparse(nn.Module):
    """conv1 -> ReLU with a negative bias (mostly zeros: compressible) -> conv2 -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.conv1.bias.fill_(-1.0)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.conv2(self.relu(self.conv1(x))))))


def sparse() -> nn.Module:
    """``Sparse`` on 1x4x32x32 inputs: its ReLU output compresses well, its input does not."""
    torch.manual_seed(0)
    return _seeded(Sparse())


def broken() -> nn.Module:
    """A factory that raises."""
    raise RuntimeError("weights file missing")


def not_a_module():
    """A factory that returns something other than a module."""
    return 42
