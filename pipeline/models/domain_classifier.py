"""A small CNN classifier trained on a data set's own train split. Its penultimate features and its
softmax give FID and IS in a feature space that fits data sets far from ImageNet (Fashion-MNIST, small
images). Figures from it are named `*_domain` and are never reported as Inception FID or IS."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.cpu_linear import Linear


class DomainClassifier(nn.Module):
    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.trunk = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.features_head = nn.Sequential(nn.Flatten(), nn.LazyLinear(feature_dim), nn.ReLU())
        self.classifier = Linear(feature_dim, num_classes)
        self.num_classes, self.width, self.feature_dim = num_classes, width, feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images in [0, 1], (N, 3, H, W) -> (N, feature_dim)."""
        return self.features_head(self.trunk(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def train_domain_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 3,
                            batch_size: int = 128, seed: int = 0, width: int = 32) -> DomainClassifier:
    """Fit on uint8 (N, H, W, 3) or float (N, 3, H, W) images with light flip augmentation."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255
    model = DomainClassifier(num_classes, width)
    model(images[:2])  # materialise the lazy layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * max(1, len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
