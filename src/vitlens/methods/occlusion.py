"""Occlusion (Zeiler & Fergus 2014): how much the target's score drops when a window is covered, all windows batched,
spread back over the image: each pixel gets the mean drop of the windows that cover it.

Works on any image classifier (see `vitlens.methods.lime.as_classifier`).
"""

from __future__ import annotations

import math
import sys

import torch

from vitlens._utils import pair
from vitlens.errors import VitlensError
from vitlens.explanation import Explanation, max_normalize
from vitlens.methods.base import BATCH, OUTPUT, Images, Option, PerturbationMethod, Target, register
from vitlens.methods.lime import gaussian_blur

BASELINES = ("mean", "blur")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one side: 0, stride, ... while the window fits."""
    if window > size:
        raise VitlensError(f"occlusion window {window} is larger than the image side {size}")
    return list(range(0, size - window + 1, stride))


def parse_baseline(value: str | float) -> str | float:
    """'mean', 'blur' or a finite number (text or number) -> the baseline."""
    if isinstance(value, str) and value in BASELINES:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VitlensError(f"baseline must be a number, mean or blur; got {value!r}") from None
    if not math.isfinite(number):
        raise VitlensError(f"baseline must be a finite number, mean or blur; got {value!r}")
    return number


def _pair_text(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        return pair(int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts), "window")
    except ValueError:
        raise VitlensError(f"window and stride must be N or H,W of positive integers; got {text!r}") from None


@register
class Occlusion(PerturbationMethod):
    """Score drop of the target class when each ``window`` (h, w) placed every ``stride`` (h, w) pixels is replaced
    by ``baseline``: a number (in the model's input space, i.e. after normalisation; 0.0 is the dataset mean),
    'mean' (the image's mean colour) or 'blur' (the blurred image, sigma = max(H, W) / 20).

    ``maps`` [B, H, W] are in image coordinates: each pixel holds the mean of the signed drops of every window that
    covers it (overlapping windows are averaged, as captum's Occlusion does), then the positive part is divided by its
    maximum. Pixels that no window covers (when the stride does not reach the right or bottom edge) get 0: no
    evidence either way, and never NaN. ``extras`` holds:

    - ``'drop'`` [B, nh, nw]: the signed drop of each window position (score of the image minus score with the
      window covered);
    - ``'grid'`` [B, nh, nw]: the window-grid map (positive drops divided by their maximum);
    - ``'pixel_drop'`` [B, H, W]: the signed per-pixel mean drop that ``maps`` normalises;
    - ``'coverage'`` [H, W]: how many windows cover each pixel (int64);
    - ``'starts_y'`` / ``'starts_x'``: the windows' top / left pixel.

    Scores are probabilities (``output='probs'``) or logits.
    """

    name = "occlusion"
    description = "drop of the class score when each window of the image is covered (overlaps averaged)"
    options = (
        Option("window", object, "16", "Occluding window in pixels: N or H,W.", parse=_pair_text),
        Option("stride", object, None, "Step between windows: N or H,W [default: the window].", parse=_pair_text),
        Option("baseline", object, "0", "What covers a window: a number in the model's input space (0 = dataset "
               "mean), mean or blur.", parse=parse_baseline),
        BATCH, OUTPUT,
    )

    def __init__(self, model, window=(16, 16), stride=None, baseline=0.0, batch_size: int = 64,
                 output: str = "probs", progress: bool = False) -> None:
        super().__init__(model, output=output, batch_size=batch_size, progress=progress)
        self.window = _pair_text(window) if isinstance(window, str) else pair(window, "window")
        stride = self.window if stride is None else stride
        self.stride = _pair_text(stride) if isinstance(stride, str) else pair(stride, "stride")
        if not isinstance(baseline, (str, int, float)) or isinstance(baseline, bool):
            raise VitlensError(f"baseline must be a number, mean or blur; got {baseline!r}")
        self.baseline = parse_baseline(baseline)

    @property
    def params(self) -> dict:
        """The options, for the Explanation."""
        return dict(window=self.window, stride=self.stride, baseline=self.baseline, output=self.output)

    def baseline_image(self, x: torch.Tensor) -> torch.Tensor:
        """What covers a window, [3, H, W]."""
        if self.baseline == "mean":
            return x.mean((1, 2), keepdim=True).expand_as(x)
        if self.baseline == "blur":
            return gaussian_blur(x, max(x.shape[-2:]) / 20.0)
        return torch.full_like(x, float(self.baseline))

    def window_extents(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool [nh, H] (row r inside the i-th window row) and [nw, W] (column c inside the j-th window column)."""
        ys = window_starts(h, self.window[0], self.stride[0])
        xs = window_starts(w, self.window[1], self.stride[1])
        y0 = torch.tensor(ys, device=device)[:, None]
        x0 = torch.tensor(xs, device=device)[:, None]
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        return (rows >= y0) & (rows < y0 + self.window[0]), (cols >= x0) & (cols < x0 + self.window[1])

    def window_masks(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, list[int], list[int]]:
        """Bool masks [nh * nw, H, W] (True inside each window), built by broadcasting, and the start lists."""
        in_y, in_x = self.window_extents(h, w, device)
        masks = in_y[:, None, :, None] & in_x[None, :, None, :]  # [nh, nw, H, W]
        ys = window_starts(h, self.window[0], self.stride[0])
        xs = window_starts(w, self.window[1], self.stride[1])
        return masks.reshape(-1, h, w), ys, xs

    def to_pixels(self, drop: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window drops [B, nh, nw] -> (mean drop of the windows covering each pixel [B, H, W], 0 where none does;
        number of covering windows [H, W]). A window is a product of a row range and a column range, so the sum over
        windows is in_y^T @ drop @ in_x."""
        in_y, in_x = (m.to(drop.dtype) for m in self.window_extents(h, w, drop.device))
        total = in_y.T @ drop @ in_x  # [B, H, W]
        coverage = in_y.sum(0)[:, None] * in_x.sum(0)[None, :]
        mean = torch.where(coverage > 0, total / coverage.clamp_min(1), torch.zeros_like(total))
        return mean, coverage.round().long()

    def explain(self, x: Images, target: Target = None) -> Explanation:
        """Occlusion maps for a batch."""
        from tqdm.auto import tqdm

        x = self.batch(x)
        with torch.no_grad():
            logits = self.model(x)
        t = self.model.check_target(target, logits)
        base_scores = self.scores(logits)
        h, w = x.shape[-2:]
        masks, ys, xs = self.window_masks(h, w, x.device)
        drops = []
        bar = tqdm(total=x.shape[0] * masks.shape[0], desc="occlusion", unit="window",
                   disable=None if self.progress else True, file=sys.stderr)
        with torch.no_grad(), bar:
            for b in range(x.shape[0]):
                fill = self.baseline_image(x[b])
                out = []
                for s in range(0, masks.shape[0], self.build_step):
                    m = masks[s : s + self.build_step, None]
                    scores = self.chunked_scores(torch.where(m, fill, x[b]))
                    out.append(scores[:, t[b]])
                    bar.update(m.shape[0])
                drops.append(base_scores[b, t[b]] - torch.cat(out))
        drop = torch.stack(drops).view(x.shape[0], len(ys), len(xs)).float()
        pixel_drop, coverage = self.to_pixels(drop, h, w)
        extras = dict(drop=drop, grid=max_normalize(drop.clamp_min(0)), pixel_drop=pixel_drop, coverage=coverage,
                      starts_y=torch.tensor(ys), starts_x=torch.tensor(xs))
        return Explanation(maps=max_normalize(pixel_drop.clamp_min(0)), method=self.name, params=self.params, target=t,
                           logits=logits.detach(), probs=self.model.probabilities(logits.detach()), extras=extras)
