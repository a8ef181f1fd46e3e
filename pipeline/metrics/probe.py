"""Linear probe: one softmax layer on frozen features, trained full-batch with L-BFGS.

Features are standardised with the train split's mean and std, so one weight decay suits every block
and every feature scale. Deterministic for a given input: no data order, no learning-rate schedule.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 num_classes: int, weight_decay: float = 1e-4, iterations: int = 200) -> dict[str, float]:
    """Top-1 accuracy on val (and train) of a softmax classifier fitted on train features."""
    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float64)
    v = torch.as_tensor(np.asarray(val_x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, v = (x - mean) / std, (v - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_top1 = float(((x @ weight + bias).argmax(1) == y).double().mean())
        val_top1 = float(((v @ weight + bias).argmax(1).numpy() == np.asarray(val_y)).mean())
    return {"top1": val_top1, "train_top1": train_top1}
