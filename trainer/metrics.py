"""Losses and metrics on model outputs, as plain Python floats; ``evaluate`` scores a model.

Classification: one logit per class, cross-entropy, accuracy, and ROC AUC (on the softmax
probability of class 1) when there are two classes. Regression: one output, the model
predicts standardised targets, MSE is the loss in standardised units, and RMSE / MAE / R^2
are reported in the target's original units (``y = y_std * y_scale + y_mean``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import forward_batched

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def regression_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of a one-output network ``(B, 1)`` against standardised targets ``(B,)``."""
    return F.mse_loss(out.squeeze(-1).float(), y)


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def loss_function(task: str) -> LossFn:
    if task == "classification":
        return classification_loss
    if task == "regression":
        return regression_loss
    raise ValueError(f"data.task: unknown task {task!r}; allowed: classification, regression")


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, prefix: str = "",
                           extended: bool = True) -> dict[str, float]:
    """``loss`` and ``accuracy``; with ``extended`` and two classes also ``roc_auc``."""
    logits = logits.float()
    out = {f"{prefix}loss": classification_loss(logits, y).item(),
           f"{prefix}accuracy": (logits.argmax(-1) == y).float().mean().item()}
    if extended and logits.shape[-1] == 2:
        auc = roc_auc(torch.softmax(logits, -1)[:, 1], y)
        if auc is not None:
            out[f"{prefix}roc_auc"] = auc
    return out


def roc_auc(score: torch.Tensor, y: torch.Tensor) -> float | None:
    """ROC AUC of a class-1 score; None when ``y`` holds a single class (it is undefined)."""
    from sklearn.metrics import roc_auc_score

    labels = y.cpu().numpy()
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, score.float().cpu().numpy()))


def regression_metrics(out: torch.Tensor, y: torch.Tensor, y_mean: float = 0.0,
                       y_scale: float = 1.0, prefix: str = "",
                       extended: bool = True) -> dict[str, float]:
    """``loss`` (standardised MSE) and ``rmse``; with ``extended`` also ``mae`` and ``r2``.

    RMSE and MAE are in original units; R^2 does not depend on the units.
    """
    pred = out.squeeze(-1).float()
    err = (pred - y) * y_scale  # (N,) in original units
    metrics = {f"{prefix}loss": F.mse_loss(pred, y).item(),
               f"{prefix}rmse": err.square().mean().sqrt().item()}
    if extended:
        metrics[f"{prefix}mae"] = err.abs().mean().item()
        metrics[f"{prefix}r2"] = r2_score(pred, y)
    return metrics


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """1 - SS_res / SS_tot (nan when ``y`` is constant)."""
    ss_res = (y - pred).double().square().sum()
    ss_tot = (y - y.double().mean()).double().square().sum()
    if ss_tot.item() == 0.0:
        return float("nan")
    return 1.0 - (ss_res / ss_tot).item()


def task_metrics(out: torch.Tensor, y: torch.Tensor, task: str, y_mean: float = 0.0,
                 y_scale: float = 1.0, prefix: str = "",
                 extended: bool = True) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(out, y, prefix, extended)
    if task == "regression":
        return regression_metrics(out, y, y_mean, y_scale, prefix, extended)
    raise ValueError(f"data.task: unknown task {task!r}; allowed: classification, regression")


def evaluate(model: nn.Module, x: Any, y: Any, data: Any, prefix: str = "test_", *,
             y_mean: float = 0.0, y_scale: float = 1.0,
             extended: bool = True) -> dict[str, float]:
    """Loss and metrics of ``model`` on (x, y), keys prefixed (``test_loss`` ...).

    ``data`` is a ``TensorData`` (or anything with task, y_mean, y_scale) or the task name.
    Classification: loss, accuracy (+ roc_auc for two classes); regression: loss
    (standardised MSE), rmse, mae, r2 in original units. ``extended=False``: the first two.
    """
    if isinstance(data, str):
        task = data
    else:
        task, y_mean, y_scale = data.task, data.y_mean, data.y_scale
    out = forward_batched(model, x)  # (N, outputs), eval mode, no grad
    return task_metrics(out, torch.as_tensor(y).to(out.device), task, y_mean, y_scale,
                        prefix, extended)
