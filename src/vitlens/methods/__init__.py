"""Explanation methods, one file each; importing this package registers them all in `METHODS`."""

from vitlens.methods.attention import AttentionMaps
from vitlens.methods.attnlrp import AttnLRP  # noqa: F401
from vitlens.methods.base import METHODS, GradientMethod, Method, Option, PerturbationMethod, register
from vitlens.methods.flow import AttentionFlow  # noqa: F401
from vitlens.methods.gae import GenericAttention  # noqa: F401
from vitlens.methods.grad_rollout import GradRollout
from vitlens.methods.input_attribution import InputXGradient, IntegratedGradients, Saliency  # noqa: F401
from vitlens.methods.legrad import LeGrad  # noqa: F401
from vitlens.methods.lime import Lime
from vitlens.methods.occlusion import Occlusion
from vitlens.methods.rollout import Rollout
from vitlens.methods.token_gradcam import TokenGradCAM  # noqa: F401
from vitlens.methods.transformer_attribution import TransformerAttribution  # noqa: F401

__all__ = ["METHODS", "AttentionMaps", "GradRollout", "GradientMethod", "Lime", "Method", "Occlusion", "Option",
           "PerturbationMethod", "Rollout", "register"]
