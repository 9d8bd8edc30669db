"""Explanation methods, one file each."""

from vitlens.methods.attention import AttentionMaps
from vitlens.methods.grad_rollout import GradRollout
from vitlens.methods.rollout import Rollout

METHODS = {"attention": AttentionMaps, "rollout": Rollout, "grad_rollout": GradRollout}

__all__ = ["METHODS", "AttentionMaps", "GradRollout", "Rollout"]
