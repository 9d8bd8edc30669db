"""Evaluation of explanations: localisation against ground-truth masks."""

from vitlens.eval.localisation import Localisation, grad_rollout_in_mask, mask_cover, max_in_mask

__all__ = ["Localisation", "grad_rollout_in_mask", "mask_cover", "max_in_mask"]
