"""An independent per-token loop rebuilding a Swin block's attention in image coordinates from its input, its q/k
weights, its relative position bias table and the shifted-window mask."""

from __future__ import annotations

import math

import torch

from oracles import forward_inputs


def swin_blocks(module) -> list:
    """HF SwinLayer modules or timm SwinTransformerBlock modules, in forward order."""
    if type(module).__module__.startswith("timm."):
        return [blk for stage in module.layers for blk in stage.blocks]
    return [m for m in module.modules() if type(m).__name__ in ("SwinLayer", "Swinv2Layer")]


def block_inputs(module, x: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each block's input as [B, H, W, C] with its grid."""
    got = []
    for args, kwargs in forward_inputs(module, x, swin_blocks(module)):
        hs = args[0]
        if hs.ndim == 4:  # timm: (B, H, W, C)
            got.append((hs, (hs.shape[1], hs.shape[2])))
        else:
            dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
            got.append((hs.reshape(hs.shape[0], dims[0], dims[1], -1), (int(dims[0]), int(dims[1]))))
    return got


def _region(r: int, size: int, window: int, shift: int) -> int:
    return 0 if r < size - window else (1 if r < size - shift else 2)


def _v2_score(attn, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Swinv2: cosine of q and k per head times the clamped learned scale, plus 16 sigmoid(continuous bias)."""
    cos = torch.nn.functional.cosine_similarity(q, k, dim=-1)
    scale = attn.logit_scale.view(-1).clamp(max=math.log(100.0)).exp()
    return cos * scale + 16 * torch.sigmoid(bias)


def loop_attention(block, hs: torch.Tensor, grid: tuple[int, int], timm_style: bool) -> torch.Tensor:
    """[B, heads, N, N] by a loop over tokens (slow, obvious). Swin v1 (HF, timm) and HF Swinv2."""
    h, w = grid
    v2 = type(block).__name__ in ("Swinv2Layer", "SwinTransformerV2Block")
    if v2 and timm_style:  # post-norm: attention reads the block input itself; the bias table comes out of a small MLP
        attn = block.attn
        norm = torch.nn.Identity()
        m, s = block.window_size[0], block.shift_size[0]
        heads = attn.num_heads
        wq, wk = attn.qkv.weight.chunk(3)[:2]
        bq, bk = attn.q_bias, attn.k_bias
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, heads)
    elif v2:
        attn = block.attention.self
        norm = torch.nn.Identity()
        m, s = int(block.window_size), int(block.shift_size)
        heads = attn.num_attention_heads
        wq, bq = attn.query.weight, attn.query.bias
        wk, bk = attn.key.weight, torch.zeros(attn.key.out_features)
        table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, heads)
    elif timm_style:
        norm, attn = block.norm1, block.attn
        m, s = block.window_size[0], block.shift_size[0]
        heads = attn.num_heads
        wq, bq = attn.qkv.weight.chunk(3)[0], attn.qkv.bias.chunk(3)[0]
        wk, bk = attn.qkv.weight.chunk(3)[1], attn.qkv.bias.chunk(3)[1]
        table = attn.relative_position_bias_table
    else:
        norm, attn = block.layernorm_before, block.attention
        m, s = int(block.window_size), int(block.shift_size)
        heads = attn.num_attention_heads
        wq, bq, wk, bk = attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias
        table = attn.relative_position_bias.relative_position_bias_table
    xn = norm(hs)
    hp, wp = math.ceil(h / m) * m, math.ceil(w / m) * m
    b, c = xn.shape[0], xn.shape[-1]
    d = c // heads
    # where each original token sits on the rolled, padded grid the model partitions into windows
    if timm_style:  # roll the H x W grid by -shift, then pad
        def rolled(r, cc):
            return (r - s) % h, (cc - s) % w
    else:  # pad to Hp x Wp, then roll by -shift
        def rolled(r, cc):
            return (r - s) % hp, (cc - s) % wp
    # feature at every rolled position (zeros for padding)
    feat = torch.zeros(b, hp, wp, c, dtype=xn.dtype)
    for r in range(h):
        for cc in range(w):
            feat[:, rolled(r, cc)[0], rolled(r, cc)[1]] = xn[:, r, cc]
    out = torch.zeros(b, heads, h * w, h * w, dtype=xn.dtype)
    for r in range(h):
        for cc in range(w):
            pr, pc = rolled(r, cc)
            wr, wc = pr // m, pc // m
            members = [(wr * m + i, wc * m + j) for i in range(m) for j in range(m)]
            q = (feat[:, pr, pc] @ wq.T + bq).view(b, heads, d)
            scores = []
            for qr, qc in members:
                k = (feat[:, qr, qc] @ wk.T + bk).view(b, heads, d)
                rel = (pr - qr + m - 1) * (2 * m - 1) + (pc - qc + m - 1)
                dot = (q * k).sum(-1) / math.sqrt(d) + table[rel]
                sc = _v2_score(attn, q, k, table[rel]) if v2 else dot
                if s > 0 and (_region(pr, hp, m, s), _region(pc, wp, m, s)) != (
                        _region(qr, hp, m, s), _region(qc, wp, m, s)):
                    sc = sc - 100.0
                scores.append(sc)
            probs = torch.stack(scores, -1).softmax(-1)  # [B, heads, M^2]
            for (qr, qc), col in zip(members, probs.unbind(-1)):
                # back from rolled/padded position to the original token, if it is one
                if timm_style:
                    if qr >= h or qc >= w:
                        continue
                    orow, ocol = (qr + s) % h, (qc + s) % w
                else:
                    orow, ocol = (qr + s) % hp, (qc + s) % wp
                    if orow >= h or ocol >= w:
                        continue
                out[:, :, r * w + cc, orow * w + ocol] = col
    return out
