"""LIME for images (Ribeiro et al. 2016), vectorised: one weight per superpixel, for every class at once.

Works on any image classifier: a `VitModel`, a ViT module vitlens can wrap, or any callable / ``nn.Module`` mapping
[B, 3, H, W] -> logits [B, C] (see `as_classifier`).
"""

from __future__ import annotations

import math
import sys
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.methods.base import BATCH, OUTPUT, Images, Option, PerturbationMethod, Target, register
from vitlens.methods.segmentation import SEGMENTATIONS, image_segments
from vitlens.models.token_drop import TokenDropper

HIDES = ("mean", "blur", "drop")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] (or [C, H, W]) with reflect padding."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    y = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    y = F.conv2d(y, k[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else y
    y = F.conv2d(y, k[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0] if squeeze else y


def parse_hide(hide) -> str | tuple[float, float, float]:
    """'mean', 'blur', 'drop', a grey level in [0, 1], an (r, g, b) in [0, 1], or the text 'R,G,B'."""
    if isinstance(hide, str) and hide.strip().lower() in HIDES:
        return hide.strip().lower()
    values = hide
    if isinstance(hide, str):
        try:
            values = [float(v) for v in hide.split(",")]
        except ValueError:
            msg = f"hide must be mean, blur, drop, a grey level or R,G,B in [0, 1]; got {hide!r}"
            raise VitlensError(msg) from None
    if isinstance(values, (int, float)):
        values = [float(values)] * 3
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise VitlensError(f"hide colour must be a grey level or R,G,B with values in [0, 1]; got {hide!r}")
    return tuple(values)


# ---- the surrogate --------------------------------------------------------------------------------------------------
def weighted_ridge(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                   alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise sum_i w_i (y_i - x_i b - c)^2 + alpha |b|^2 for every column of ``y`` at once (closed form, like
    sklearn's Ridge with sample_weight). x [N, S], y [N, C], w [N] -> (coef [C, S], intercept [C], weighted R^2 [C])."""
    x, y, w = x.double(), y.double(), w.double()
    sw = w / w.sum()
    xm, ym = sw @ x, sw @ y
    xc, yc = x - xm, y - ym
    a = xc.T @ (w[:, None] * xc) + alpha * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    coef = torch.linalg.solve(a, xc.T @ (w[:, None] * yc)).T
    intercept = ym - coef @ xm
    pred = x @ coef.T + intercept
    ss_res = (w[:, None] * (y - pred) ** 2).sum(0)
    ss_tot = (w[:, None] * yc**2).sum(0)
    perfect = torch.where(ss_res <= 1e-24, torch.ones_like(ss_res), torch.zeros_like(ss_res))
    r2 = torch.where(ss_tot > 1e-24, 1.0 - ss_res / ss_tot.clamp_min(1e-300), perfect)
    return coef, intercept, r2


def lime_kernel(z: torch.Tensor, kernel_width: float) -> torch.Tensor:
    """lime's sample weights: sqrt(exp(-d^2 / width^2)) with d the cosine distance of each row of the binary
    ``z`` [N, S] to the all-ones row (an all-zero row has distance 1, as sklearn's cosine distance gives)."""
    d = 1.0 - torch.sqrt(z.double().sum(1) / z.shape[1])
    return torch.sqrt(torch.exp(-(d**2) / kernel_width**2))


def patch_segments(segments: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """The segment id of each patch [gh * gw], checking every patch lies wholly in one segment."""
    ph, pw = patch
    h, w = segments.shape
    if h % ph or w % pw:
        raise VitlensError(f"hide='drop': image size {(h, w)} is not a multiple of the patch size {patch}")
    blocks = segments.view(h // ph, ph, w // pw, pw)
    first = blocks[:, :1, :, :1]
    if not bool((blocks == first).all()):
        raise VitlensError("hide='drop' needs segments aligned to the patches (each patch in one segment): use "
                           "segmentation='grid', which aligns its cells to the model's patches")
    return first.reshape(-1)


# ---- LIME -----------------------------------------------------------------------------------------------------------
@register
class Lime(PerturbationMethod):
    """LIME: fit a weighted linear surrogate of the model's scores on which superpixels are shown.

    Samples ``num_samples`` binary masks Z [N, S] (each superpixel kept with probability 1/2, the first row all ones,
    as the lime package does) from a generator seeded with ``seed``; builds the perturbed images on the model's
    device as ``lerp(hidden, x, Z[:, segments])`` (x where shown, hidden elsewhere); runs them in batches of
    ``batch_size`` (the masks are drawn first, so the batch size does not change them); weights samples by lime's
    kernel sqrt(exp(-d^2 / width^2)), d the cosine distance to the all-ones mask; fits a ridge regression
    (``alpha``, with intercept) for every class at once in closed form.

    ``hide``: 'mean' (each hidden superpixel painted with its own mean colour, lime's default), 'blur' (a Gaussian
    blur of the image, sigma = max(H, W) / 20), a colour (grey level or (r, g, b) in [0, 1]), or 'drop' (ViT only:
    hidden patches' tokens are removed after the position embedding, see `TokenDropper`; needs a patch-aligned grid).

    The Explanation's ``maps`` [B, H, W] are the target class's positive weights painted on their superpixels,
    divided by the maximum; ``extras``: ``weights`` [B, S] (signed, target class), ``class_weights`` [B, C, S],
    ``intercept`` [B], ``score`` [B] (weighted R^2 of the surrogate, target class), ``segments`` [B, H, W],
    ``num_segments`` [B]. Images with fewer segments than the batch's largest are padded with zero weights.
    """

    name = "lime"
    description = "weights of a linear surrogate fitted on which superpixels are shown (positive: supporting)"
    options = (
        Option("segmentation", str, "slic", "Superpixels: slic, quickshift (scikit-image) or a grid aligned to the "
               "patches.", choices=SEGMENTATIONS),
        Option("n_segments", int, 50, "About how many superpixels (slic, grid).", lo=1, hi=10_000),
        Option("num_samples", int, 1000, "Perturbed images sampled.", lo=2, hi=1_000_000),
        BATCH,
        Option("kernel_width", float, 0.25, "Width of lime's kernel on the cosine distance.", lo=0.0, lo_open=True,
               hi=1e6),
        Option("hide", object, "mean", "mean (each superpixel's mean colour), blur, drop (ViT token removal, grid "
               "only), or a grey level / R,G,B in [0, 1].", parse=lambda text: parse_hide(text)),
        Option("seed", int, 0, "Seed of the mask generator.", lo=0, hi=2**63 - 1),
        Option("alpha", float, 1.0, "Ridge penalty of the surrogate.", lo=0.0, hi=1e6, cli=False),
        OUTPUT,
    )
    segmentation: str
    n_segments: int
    num_samples: int
    kernel_width: float
    seed: int
    alpha: float

    def __init__(self, model, segmentation: str = "slic", n_segments: int = 50, num_samples: int = 1000,
                 batch_size: int = 64, kernel_width: float = 0.25, hide="mean", seed: int = 0, alpha: float = 1.0,
                 output: str = "probs", progress: bool = False, **segment_options) -> None:
        super().__init__(model, output=output, batch_size=batch_size, progress=progress)
        self.set_options(segmentation=segmentation, n_segments=n_segments, num_samples=num_samples,
                         kernel_width=kernel_width, seed=seed, alpha=alpha)
        self.hide = parse_hide(hide)
        self.segment_options = segment_options
        if self.hide == "drop":
            if self.segmentation != "grid":
                raise VitlensError("hide='drop' needs segmentation='grid' (cells aligned to the patches)")
            if getattr(self.model, "patch_size", None) is None:
                raise VitlensError("hide='drop' needs a ViT (a model with a patch size)")

    @property
    def params(self) -> dict:
        """The options, for the Explanation."""
        return dict(segmentation=self.segmentation, n_segments=self.n_segments, num_samples=self.num_samples,
                    kernel_width=self.kernel_width, hide=self.hide, seed=self.seed, alpha=self.alpha,
                    output=self.output)

    def segments_for(self, x: torch.Tensor) -> torch.Tensor:
        """Superpixels [H, W] (int64, on x's device) of one preprocessed image [3, H, W]."""
        align = self.model.patch_size if self.segmentation == "grid" and self.model.patch_size else None
        h, w = x.shape[-2:]
        if align and (h % align[0] or w % align[1]):
            align = None
        rgb = self.to_rgb01(x).permute(1, 2, 0).cpu().numpy()
        seg = image_segments(rgb, self.segmentation, self.n_segments, self.seed, align, **self.segment_options)
        return torch.from_numpy(seg).to(x.device)

    def sample_masks(self, num_segments: int) -> torch.Tensor:
        """Z [num_samples, S] bool from a generator seeded with ``seed``; row 0 keeps everything."""
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randint(0, 2, (self.num_samples, num_segments), generator=gen).bool()
        z[0] = True
        return z

    def hidden_image(self, x: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
        """What a hidden superpixel shows, [3, H, W]."""
        if self.hide == "mean":
            flat = segments.reshape(-1)
            sums = torch.zeros(num_segments, 3, device=x.device, dtype=x.dtype).index_add_(0, flat, x.reshape(3, -1).T)
            counts = torch.bincount(flat, minlength=num_segments).clamp_min(1).to(x.dtype)
            return (sums / counts[:, None])[segments].permute(2, 0, 1)
        if self.hide == "blur":
            return gaussian_blur(x, max(x.shape[-2:]) / 20.0)
        return self.colour(cast(tuple[float, float, float], self.hide), x).expand_as(x)

    def sample_scores(self, x: torch.Tensor, segments: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scores [N, C] (float64, CPU) of the perturbed images for masks ``z`` [N, S]."""
        from tqdm.auto import tqdm

        n = z.shape[0]
        out: torch.Tensor | None = None
        bar = tqdm(total=n, desc="lime", unit="sample", disable=None if self.progress else True, file=sys.stderr)
        with torch.no_grad(), bar:
            if self.hide == "drop":
                dropper = TokenDropper(self.model, x)
                keep = z.to(x.device)[:, patch_segments(segments, self.model.patch_size)]  # [N, gh*gw]
                counts = keep.sum(1).cpu()
                for c in torch.unique(counts).tolist():
                    rows = (counts == c).nonzero()[:, 0]
                    for s in range(0, rows.numel(), self.build_step):
                        r = rows[s : s + self.build_step]
                        y = self.chunked_scores(keep[r.to(x.device)], dropper).double().cpu()
                        out = torch.zeros(n, y.shape[1], dtype=torch.float64) if out is None else out
                        out[r] = y
                        bar.update(r.numel())
                assert out is not None  # z has at least one row
                return out
            zf = z.to(x.device, x.dtype)
            flat = segments.reshape(-1)
            hidden = self.hidden_image(x, segments, z.shape[1])
            for s in range(0, n, self.build_step):
                mask = zf[s : s + self.build_step].index_select(1, flat).view(-1, 1, *segments.shape)  # gather
                # lerp(hidden, x, m) is exactly hidden where m = 0 and exactly x where m = 1
                y = self.chunked_scores(torch.lerp(hidden, x, mask)).double().cpu()
                out = torch.zeros(n, y.shape[1], dtype=torch.float64) if out is None else out
                out[s : s + y.shape[0]] = y
                bar.update(y.shape[0])
        assert out is not None  # z has at least one row
        return out

    def explain_one(self, x: torch.Tensor, segments: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """LIME for one image [3, H, W]: coef [C, S], intercept [C], score [C], segments [H, W]."""
        seg = self.segments_for(x) if segments is None else torch.as_tensor(segments, device=x.device).long()
        if seg.shape != x.shape[-2:]:
            raise VitlensError(f"segments must be [H, W] = {tuple(x.shape[-2:])}, got {tuple(seg.shape)}")
        _, seg = torch.unique(seg, return_inverse=True)
        num = int(seg.max()) + 1
        z = self.sample_masks(num)
        y = self.sample_scores(x, seg, z)
        coef, intercept, r2 = weighted_ridge(z, y, lime_kernel(z, self.kernel_width), self.alpha)
        return dict(coef=coef.float(), intercept=intercept.float(), score=r2.float(), segments=seg)

    def explain(self, x: Images, target: Target = None, segments: torch.Tensor | np.ndarray | None = None
                ) -> Explanation:
        """LIME for a batch; ``segments`` [H, W] or [B, H, W] overrides the segmentation."""
        x = self.batch(x)
        with torch.no_grad():
            logits = self.model(x)
        t = self.model.check_target(target, logits)
        if segments is not None:
            segments = torch.as_tensor(np.asarray(segments) if not isinstance(segments, torch.Tensor) else segments)
            if segments.ndim == 2:
                segments = segments.expand(x.shape[0], -1, -1)
        fits = [self.explain_one(x[b], None if segments is None else segments[b]) for b in range(x.shape[0])]
        smax = max(f["coef"].shape[1] for f in fits)
        class_w = torch.stack([F.pad(f["coef"], (0, smax - f["coef"].shape[1])) for f in fits])  # [B, C, S]
        idx = t.cpu()
        weights = class_w[torch.arange(len(fits)), idx]  # [B, S]
        segs = torch.stack([f["segments"].cpu() for f in fits])
        painted = torch.stack([weights[b][segs[b]] for b in range(len(fits))])
        extras = dict(
            weights=weights, class_weights=class_w, segments=segs,
            intercept=torch.stack([f["intercept"][i] for f, i in zip(fits, idx)]),
            score=torch.stack([f["score"][i] for f, i in zip(fits, idx)]),
            num_segments=torch.tensor([f["coef"].shape[1] for f in fits]),
        )
        return Explanation(maps=max_normalize(painted.clamp_min(0).float()), method=self.name, params=self.params,
                           target=t, logits=logits.detach(), probs=self.model.probabilities(logits.detach()),
                           extras=extras)
