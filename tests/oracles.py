"""Independent references: attention recomputed by hand from q/k weights, and plain-loop rollouts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def is_timm(module) -> bool:
    return type(module).__module__.startswith("timm.")


def attention_modules(module) -> list:
    """The modules whose input is the block's (normed) hidden state: HF attention classes, timm blk.attn."""
    if is_timm(module):
        return [blk.attn for blk in module.blocks]
    return [m for m in module.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]


def forward_inputs(module, x: torch.Tensor, mods: list) -> list[tuple]:
    """Run ``module`` once on ``x`` (no grad) and return the (args, kwargs) each of ``mods`` was called with."""
    inputs: list[tuple] = []
    handles = [m.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x @ weight.T + (bias if bias is not None else 0)


def timm_query_key(m, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, heads, N, d] of a timm attention module: one fused qkv Linear (its own bias, or Eva's separate
    q_bias / k_bias parameters), or separate q_proj / k_proj."""
    b, n, _ = hs.shape
    heads, d = m.num_heads, m.head_dim
    if getattr(m, "qkv", None) is not None:
        bias = m.qkv.bias
        if bias is None and getattr(m, "q_bias", None) is not None:
            bias = torch.cat([m.q_bias, m.k_bias, m.v_bias])
        qkv = _linear(hs, m.qkv.weight, bias).reshape(b, n, 3, heads, d)
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    q = _linear(hs, m.q_proj.weight, m.q_proj.bias).reshape(b, n, heads, d).transpose(1, 2)
    k = _linear(hs, m.k_proj.weight, m.k_proj.bias).reshape(b, n, heads, d).transpose(1, 2)
    return q, k


def rotate_pairs(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding by hand: each pair (x[2i], x[2i+1]) of a token's head vector turned by the angle
    whose sine and cosine the table ``rope`` [N, 2d] = [sin | cos] holds (both repeated for the two members)."""
    d = x.shape[-1]
    sin, cos = rope[..., :d], rope[..., d:]
    even, odd = x[..., 0::2], x[..., 1::2]
    s, c = sin[..., 0::2], cos[..., 0::2]
    assert torch.equal(sin[..., 1::2], s) and torch.equal(cos[..., 1::2], c)  # one angle per pair
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = odd * c + even * s
    return out


def recompute_attention(module, x: torch.Tensor) -> list[torch.Tensor]:
    """Run the model once, grab each attention module's input, and rebuild softmax(q k^T / sqrt(d) + bias) by hand."""
    mods = attention_modules(module)
    inputs = forward_inputs(module, x, mods)
    out = []
    for m, (args, kwargs) in zip(mods, inputs):
        hs = args[0] if args else kwargs["hidden_states"]
        b, n, _ = hs.shape
        if is_timm(module):
            heads, d = m.num_heads, m.head_dim
            q, k = timm_query_key(m, hs)
            q, k = m.q_norm(q), m.k_norm(k)  # identities unless the model was built with qk_norm
            rope = kwargs.get("rope")
            if rope is not None:
                p = m.num_prefix_tokens
                q = torch.cat([q[:, :, :p], rotate_pairs(q[:, :, p:], rope)], 2)
                k = torch.cat([k[:, :, :p], rotate_pairs(k[:, :, p:], rope)], 2)
            bias = 0.0
        else:
            heads = m.config.num_attention_heads
            d = m.q_proj.out_features // heads
            q = (hs @ m.q_proj.weight.T + (m.q_proj.bias if m.q_proj.bias is not None else 0))
            k = (hs @ m.k_proj.weight.T + (m.k_proj.bias if m.k_proj.bias is not None else 0))
            q = q.reshape(b, n, heads, d).transpose(1, 2)
            k = k.reshape(b, n, heads, d).transpose(1, 2)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            bias = 0.0 if mask is None else mask
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d) + bias
        out.append(scores.softmax(-1))
    return out


def loop_rollout(attns: list[np.ndarray], weights: np.ndarray, num_prefix: int, grid: tuple[int, int],
                 head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
                 residual_weight: float = 0.5, normalize: bool = True) -> list[np.ndarray]:
    """One sample, plain loops: attns[l] is [H, N, N]; returns the max-normalised map after every block."""
    n = attns[0].shape[-1]
    result = np.eye(n)
    maps = []
    for layer in range(start_layer, len(attns)):
        a = attns[layer].astype(np.float64)
        fused = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                vals = [a[h, i, j] for h in range(a.shape[0])]
                fused[i, j] = {"mean": sum(vals) / len(vals), "max": max(vals), "min": min(vals)}[head_fusion]
        k = math.floor(discard_ratio * n * n)
        order = sorted(range(n * n), key=lambda t: fused[t // n, t % n])
        for t in order[:k]:
            if t != 0:
                fused[t // n, t % n] = 0.0
        for i in range(n):
            for j in range(n):
                fused[i, j] = (1 - residual_weight) * fused[i, j] + (residual_weight if i == j else 0.0)
        if normalize:
            for i in range(n):
                s = sum(fused[i])
                for j in range(n):
                    fused[i, j] /= s
        new = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                new[i, j] = sum(fused[i, t] * result[t, j] for t in range(n))
        result = new
        row = [sum(weights[t] * result[t, j] for t in range(n)) for j in range(num_prefix, n)]
        m = np.array(row).reshape(grid)
        maps.append(m / m.max() if m.max() > 0 else m)
    return maps


@contextmanager
def retained_attention(module) -> Iterator[list[torch.Tensor]]:
    """While open, ``module`` (transformers) computes attention through the test's own function, which appends each
    block's softmax output to the yielded list with retain_grad on (an independent path: no vitlens hooks)."""
    from transformers import AttentionInterface

    store: list[torch.Tensor] = []

    def oracle_attention(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        scores = query @ key.transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)
        probs.retain_grad()
        store.append(probs)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("vitlens_oracle", oracle_attention)
    configs = {id(m.config): m.config for m in module.modules() if hasattr(m, "config")}
    saved = [(c, c._attn_implementation) for c in configs.values()]
    for c, _ in saved:
        c._attn_implementation = "vitlens_oracle"
    try:
        yield store
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
        module.zero_grad(set_to_none=True)


def retain_grad_attention(module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """d logit[target] / d attention probabilities, captured by an independent path (`retained_attention`)."""
    with retained_attention(module) as store:
        logits = module(pixel_values=x).logits
        logits.gather(1, target[:, None]).sum().backward()
    return [p.grad for p in store]


def directional_derivative(module, x: torch.Tensor, target: torch.Tensor, block: int, delta: torch.Tensor,
                           eps: float = 1e-6) -> float:
    """timm: (score(P + eps*delta) - score(P - eps*delta)) / 2 eps, perturbing block ``block``'s probabilities."""
    attn = module.blocks[block].attn
    flags = [(blk.attn, blk.attn.fused_attn) for blk in module.blocks]
    scores = []
    try:
        for blk in module.blocks:
            blk.attn.fused_attn = False
        for sign in (1.0, -1.0):
            h = attn.attn_drop.register_forward_hook(lambda m, a, o, s=sign: o + s * eps * delta)
            with torch.no_grad():
                out = module(x.double()).gather(1, target[:, None]).sum()
            h.remove()
            scores.append(float(out))
    finally:
        for a, f in flags:
            a.fused_attn = f
    return (scores[0] - scores[1]) / (2 * eps)


def max_norm(a: np.ndarray) -> np.ndarray:
    return a / a.max()

