"""Slow, explicit LRP on a timm VisionTransformer, one image at a time, in float64.

The forward is recomputed from the module's parameters (einsum per head, no timm code), and relevance is propagated
backwards in RELEVANCE form: every rule divides the relevance of an output by its value and redistributes it over
explicit contribution tensors (c[k, j] = w_kj x_j for a linear layer, A_ij V_jd for A @ V, ...). No modified
gradients: an independent oracle for vitlens.methods.lrp_rules (which works in gradient x input form).
"""

from __future__ import annotations

import torch


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def linear_contrib(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """c[n, k, j] = w_kj x_nj."""
    return x[:, None, :] * w[None]


def rel_linear(x, w, b, r, rules, eps=0.0):
    """Relevance of x [N, in] from relevance r [N, out] of x @ w.T + b."""
    c = linear_contrib(x, w)
    if rules == "chefer":  # alpha 1, beta 0: positive contributions only, bias excluded
        cp = c.clamp(min=0)
        z = cp.sum(-1)
        s = r / (z + 1e-9) * (z != 0)
        return (cp * s[..., None]).sum(1)
    z = c.sum(-1) + b
    return (c * (r / _stab(z, eps))[..., None]).sum(1)


def rel_layer_norm(x, gamma, beta, r, rules, ln_eps):
    """Chefer: identity. AttnLRP: z-rule over y_k = sum_j (delta_kj - 1/D) x_j gamma_k / std + beta_k."""
    if rules == "chefer":
        return r
    d = x.shape[-1]
    std = (x.var(-1, unbiased=False, keepdim=True) + ln_eps).sqrt()
    m = torch.eye(d, dtype=x.dtype) - 1.0 / d  # [k, j]
    c = m[None] * x[:, None, :] * (gamma[:, None] / std[:, :, None])  # [n, k, j]
    y = c.sum(-1) + beta
    return (c * (r / y)[..., None]).sum(1)


def rel_softmax(x, s, r, rules):
    """Chefer: identity. AttnLRP: R_in = x * (R_out - s * sum R_out) per row."""
    if rules == "chefer":
        return r
    return x * (r - s * r.sum(-1, keepdim=True))


def rel_matmul(a, b, r):
    """(relevance of a [I, J], of b [J, D]) from relevance r of a @ b: z-rule on a_ij b_jd, half to each."""
    c = a[:, :, None] * b[None]  # [i, j, d]
    s = r / (a @ b)  # [i, d]
    ca = c * s[:, None, :]
    return 0.5 * ca.sum(2), 0.5 * ca.sum(0)


def rel_add(a, b, r, rules):
    """z-rule split of r over a + b; Chefer: both parts rescaled to |sum R_a| : |sum R_b| of sum R."""
    z = a + b
    ra, rb = a * r / z, b * r / z
    if rules == "chefer":
        sa, sb, tot = ra.sum(), rb.sum(), r.sum()
        fa = sa.abs() / (sa.abs() + sb.abs()) * tot
        fb = sb.abs() / (sa.abs() + sb.abs()) * tot
        ra, rb = ra * fa / sa, rb * fb / sb
    return ra, rb


def timm_params(module):
    """The parameters of a timm ViT, as float64 tensors."""
    return {k: v.detach().double() for k, v in module.state_dict().items()}


def forward(module, img: torch.Tensor) -> dict:
    """Explicit forward of one image [3, H, W]; returns every intermediate needed for relevance and gradients."""
    p = timm_params(module)
    heads = module.blocks[0].attn.num_heads
    ln_eps = module.blocks[0].norm1.eps
    ps = module.patch_embed.patch_size[0]
    c, h, w = img.shape
    patches = img.double().unfold(1, ps, ps).unfold(2, ps, ps)  # [3, gh, gw, ps, ps]
    patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, c * ps * ps)  # [P, 3*ps*ps] row-major grid
    w_pe = p["patch_embed.proj.weight"].reshape(p["patch_embed.proj.weight"].shape[0], -1)
    t = {"patches": patches, "w_pe": w_pe, "b_pe": p["patch_embed.proj.bias"]}
    emb = patches @ w_pe.T + t["b_pe"]
    tokens0 = torch.cat([p["cls_token"][0], emb], 0)
    x = tokens0 + p["pos_embed"][0]
    t.update(emb=emb, tokens0=tokens0, pos=p["pos_embed"][0], blocks=[])

    def ln(v, key):
        mu = v.mean(-1, keepdim=True)
        std = (v.var(-1, unbiased=False, keepdim=True) + ln_eps).sqrt()
        return (v - mu) / std * p[key + ".weight"] + p[key + ".bias"]

    for i in range(len(module.blocks)):
        k = f"blocks.{i}."
        blk = {"x_in": x}
        n1 = ln(x, k + "norm1")
        qkv = n1 @ p[k + "attn.qkv.weight"].T + p[k + "attn.qkv.bias"]
        d = x.shape[-1]
        hd = d // heads
        q, kk, v = (qkv[:, j * d:(j + 1) * d].reshape(-1, heads, hd).transpose(0, 1) for j in range(3))
        qs = q * hd ** -0.5
        scores = qs @ kk.transpose(-1, -2)
        attn = scores.softmax(-1)
        ctx = attn @ v  # [H, N, hd]
        merged = ctx.transpose(0, 1).reshape(-1, d)
        proj = merged @ p[k + "attn.proj.weight"].T + p[k + "attn.proj.bias"]
        x1 = x + proj
        n2 = ln(x1, k + "norm2")
        h1 = n2 @ p[k + "mlp.fc1.weight"].T + p[k + "mlp.fc1.bias"]
        g1 = torch.nn.functional.gelu(h1)
        h2 = g1 @ p[k + "mlp.fc2.weight"].T + p[k + "mlp.fc2.bias"]
        x2 = x1 + h2
        blk.update(n1=n1, qkv=qkv, qs=qs, k=kk, v=v, scores=scores, attn=attn, ctx=ctx, merged=merged, proj=proj,
                   x1=x1, n2=n2, h1=h1, g1=g1, h2=h2, x2=x2)
        t["blocks"].append(blk)
        x = x2
    t["x_final"] = x
    t["normed"] = ln(x, "norm")
    t["logits"] = t["normed"][0] @ p["head.weight"].T + p["head.bias"]
    t["p"], t["heads"], t["ln_eps"] = p, heads, ln_eps
    return t


def relevance(module, img: torch.Tensor, target: int, rules: str, eps: float = 0.0) -> dict:
    """Explicit LRP of ``logits[target]`` for one image: {'attn': [R(A) per block, [H, N, N]], 'pixels': [3, H, W]
    (AttnLRP only), 'logits': ...}. Chefer starts from relevance 1 on the target, AttnLRP from the logit."""
    t = forward(module, img)
    p, heads, ln_eps = t["p"], t["heads"], t["ln_eps"]
    logits = t["logits"]
    r_logits = torch.zeros_like(logits)
    r_logits[target] = 1.0 if rules == "chefer" else logits[target]
    r_cls = rel_linear(t["normed"][:1], p["head.weight"], p["head.bias"], r_logits[None], rules, eps)
    r_normed = torch.zeros_like(t["normed"])
    r_normed[0] = r_cls[0]
    r = rel_layer_norm(t["x_final"], p["norm.weight"], p["norm.bias"], r_normed, rules, ln_eps)
    attn_rel = [None] * len(t["blocks"])
    for i in reversed(range(len(t["blocks"]))):
        b, k = t["blocks"][i], f"blocks.{i}."
        r_x1, r_h2 = rel_add(b["x1"], b["h2"], r, rules)
        r_g1 = rel_linear(b["g1"], p[k + "mlp.fc2.weight"], p[k + "mlp.fc2.bias"], r_h2, rules, eps)
        r_h1 = r_g1  # GELU: identity
        r_n2 = rel_linear(b["n2"], p[k + "mlp.fc1.weight"], p[k + "mlp.fc1.bias"], r_h1, rules, eps)
        r_x1 = r_x1 + rel_layer_norm(b["x1"], p[k + "norm2.weight"], p[k + "norm2.bias"], r_n2, rules, ln_eps)
        r_x, r_proj = rel_add(b["x_in"], b["proj"], r_x1, rules)
        r_merged = rel_linear(b["merged"], p[k + "attn.proj.weight"], p[k + "attn.proj.bias"], r_proj, rules, eps)
        n, d = r_merged.shape
        r_ctx = r_merged.reshape(n, heads, d // heads).transpose(0, 1)
        r_attn, r_v, r_q, r_k = [], [], [], []
        for hh in range(heads):
            ra, rv = rel_matmul(b["attn"][hh], b["v"][hh], r_ctx[hh])
            rs = rel_softmax(b["scores"][hh], b["attn"][hh], ra, rules)
            rq, rkt = rel_matmul(b["qs"][hh], b["k"][hh].T, rs)
            r_attn.append(ra)
            r_v.append(rv)
            r_q.append(rq)  # q * scale: a constant factor, relevance unchanged
            r_k.append(rkt.T)
        attn_rel[i] = torch.stack(r_attn)
        r_qkv = torch.cat([torch.stack(rr).transpose(0, 1).reshape(n, d) for rr in (r_q, r_k, r_v)], -1)
        r_n1 = rel_linear(b["n1"], p[k + "attn.qkv.weight"], p[k + "attn.qkv.bias"], r_qkv, rules, eps)
        r = r_x + rel_layer_norm(b["x_in"], p[k + "norm1.weight"], p[k + "norm1.bias"], r_n1, rules, ln_eps)
    out = {"attn": attn_rel, "logits": logits, "fwd": t}
    if rules != "chefer":
        r_tokens0, _ = rel_add(t["tokens0"], t["pos"].expand_as(t["tokens0"]), r, "attnlrp")
        r_patch = rel_linear(t["patches"], t["w_pe"], t["b_pe"], r_tokens0[1:], rules, eps)  # [P, 3*ps*ps]
        c, hgt, wid = img.shape
        ps = module.patch_embed.patch_size[0]
        gh, gw = hgt // ps, wid // ps
        out["pixels"] = r_patch.reshape(gh, gw, c, ps, ps).permute(2, 0, 3, 1, 4).reshape(c, hgt, wid)
    return out


def attention_gradient(module, img: torch.Tensor, target: int) -> list[torch.Tensor]:
    """d logits[target] / d attention [H, N, N] per block, by autograd on the explicit forward."""
    t = forward(module, img.double().requires_grad_(True))
    attns = [b["attn"] for b in t["blocks"]]
    return list(torch.autograd.grad(t["logits"][target], attns))


def chefer_map(module, img: torch.Tensor, target: int, start_layer: int = 0) -> torch.Tensor:
    """Transformer attribution of one image: rollout of I + mean_h clamp(grad * R(A)) over blocks >= start_layer,
    CLS row over patches, [gh, gw]."""
    rel = relevance(module, img, target, "chefer")["attn"]
    grads = attention_gradient(module, img, target)
    n = rel[0].shape[-1]
    joint = torch.eye(n, dtype=torch.float64)
    for i in range(start_layer, len(rel)):
        cam = (grads[i] * rel[i]).clamp(min=0).mean(0)
        joint = (torch.eye(n, dtype=torch.float64) + cam) @ joint
    ps = module.patch_embed.patch_size[0]
    return joint[0, 1:].reshape(img.shape[1] // ps, img.shape[2] // ps)
