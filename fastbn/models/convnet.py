from torch import nn

from fastbn.models.layers import batch_norm, check_backend

# (out_channels or "pool") in order; every conv is 3x3/s1/p1 + BN + ReLU, every pool 3x3/s2/p1
PLAN = [64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool", 512, 512, "pool"]


class ConvNet(nn.Module):
    """The study's VGG-style ConvNet for 32x32 inputs: the PLAN above, then Linear(512, classes)."""

    def __init__(self, n_channels=3, n_classes=10, backend="fastbn"):
        super().__init__()
        check_backend(backend)
        layers, c_in = [], n_channels
        for item in PLAN:
            if item == "pool":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            else:
                layers += [nn.Conv2d(c_in, item, 3, stride=1, padding=1), batch_norm(item, 2, backend),
                           nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, n_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
