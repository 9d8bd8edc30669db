"""Training utilities: the loop, multi-label metrics and the recipes of the embedded models."""

from vitlens.train.loop import History, bce_loss, logits_of, lr_at, train
from vitlens.train.metrics import average_precision, mean_average_precision, per_class_ap, per_item_recall

__all__ = [
    "History",
    "average_precision",
    "bce_loss",
    "logits_of",
    "lr_at",
    "mean_average_precision",
    "per_class_ap",
    "per_item_recall",
    "train",
]
