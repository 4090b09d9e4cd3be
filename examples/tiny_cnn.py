"""A small residual CNN, as a user would bring their own model to partc.

    partc inspect examples/tiny_cnn.py:build --input-shape 1,3,64,64
    python examples/tiny_cnn.py          # the same through the Python API
"""

from torch import nn


class TinyResNet(nn.Module):
    """Stem, one residual block with a skip connection, and a classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.conv2(self.relu(self.conv1(x))))
        return self.head(x)


def build() -> nn.Module:
    """The factory partc calls: no arguments, returns the module."""
    return TinyResNet()


if __name__ == "__main__":
    import partc

    report = partc.inspect("examples/tiny_cnn.py:build", ["1,3,64,64"])
    print(report.table())
    assert report.macs > 0
