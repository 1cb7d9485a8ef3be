"""A user's own model and data set, defined outside octconv_exp (tests import them by
``model._target_=my_research.TinyNet`` / ``dataset._target_=my_research.Stripes`` with this
folder on PYTHONPATH), written against the documented contracts only."""
import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """A plain classifier returning logits: octconv-exp adds the loss (WithLoss)."""

    def __init__(self, num_classes=10, hidden=8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(hidden * 16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class Stripes:
    """A torchvision-style data set: Stripes(size=..., train=True|False) -> (image, label),
    images as HxWx3 uint8 arrays whose stripe direction and colour give the class."""

    classes = ["horizontal-red", "vertical-red", "horizontal-blue", "vertical-blue"]

    def __init__(self, size=64, image_size=24, train=True):
        g = torch.Generator().manual_seed(0 if train else 1)
        self.labels = torch.randint(0, 4, (size,), generator=g)
        self.noise = torch.randint(0, 40, (size, image_size, image_size, 3), generator=g)
        self.image_size = image_size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        s = self.image_size
        stripes = (torch.arange(s) // 3 % 2).to(torch.uint8) * 200
        img = (stripes.view(s, 1).expand(s, s) if label % 2 == 0
               else stripes.view(1, s).expand(s, s))
        rgb = torch.zeros(s, s, 3, dtype=torch.int64)
        rgb[..., 0 if label < 2 else 2] = img
        return (rgb + self.noise[i]).clamp(0, 255).to(torch.uint8).numpy(), label


class DropNet(nn.Module):
    """TinyNet with dropout: its masks come from torch's global random generator, so a run
    resumed inside an epoch repeats the uninterrupted one only if that generator's state was
    restored from the checkpoint (tests/test_robustness.py)."""

    def __init__(self, num_classes=10, hidden=8, p=0.5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Dropout(p), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Dropout(p), nn.Linear(hidden * 16, num_classes))

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))
