"""An evaluator for the miniature world: a tiny CNN with one classification head per attribute.

Scores for a set of images (float (N, 3, H, W) in [0, 1], as the folder dataset yields, or uint8
(N, H, W, 3)):

- `attribute_accuracy(images, targets)`: per-attribute accuracy of the classifier's predictions against
  the attributes their prompts state (`targets` are `Attributes`, partial dicts, or captions parsed with
  `parse_caption`), plus their mean over the stated attributes;
- `frechet_distance(images, reference)`: the Fréchet distance between Gaussian fits of the CNN's
  penultimate-layer features of the images and of real world samples (`reference_stats`);
- `sharpness(images)`: mean squared Laplacian of the luminance (blur lowers it); `score` reports it as a
  ratio to real world samples (1 = as sharp as the world, << 1 = blurred).

`train_evaluator(seed, steps)` trains it reproducibly (fixed seed, fixed data, fixed step count; bitwise
repeatable with the same thread count) on freshly generated world samples, concept texture included so
the evaluator can also score concept adherence. Weights are saved and loaded as safetensors, with the
architecture and training settings in the file's metadata (never pickles).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .generator import ATTRIBUTES, TEXTURES, VOCAB, Attributes, parse_caption, sample_world

FORMAT = "dopsd-world-evaluator/1"

# The evaluator's quality bar for "looks like the world": the mean attribute accuracy real world samples reach
# (0.99 on held-out ones). A model's samples that reach it draw what their prompts state about as reliably.
ACC_BAR = 0.95


@dataclass(frozen=True)
class EvaluatorConfig:
    size: int = 32
    width: int = 32  # channels of the first conv (then 2x, 2x)
    feature_dim: int = 128  # the layout part of the penultimate layer (the Fréchet features), + 2 * width pooled


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    steps: int = 800
    batch_size: int = 64
    num_train: int = 4000
    lr: float = 3e-3


class WorldEvaluator(nn.Module):
    def __init__(self, cfg: EvaluatorConfig = EvaluatorConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(  # strided 4x4 convs: a kernel spans a texture period; cheap on a CPU
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.ReLU(),           # /2
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),       # /4
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),   # /8: keeps a coarse layout (position)
        )
        cells = (cfg.size // 8) ** 2
        self.fc = nn.Linear(2 * w * cells, cfg.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.feature_dim + 2 * w, len(v)) for name, v in VOCAB.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features of float (N, 3, H, W) images in [0, 1]."""
        h = self.body(x * 2 - 1)
        # layout-aware (flattened map) and translation-invariant (global max) features: shapes move around
        return torch.cat([F.relu(self.fc(h.flatten(1))), h.amax(dim=(2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}

    # ------------------------------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _run(self, images, fn, batch: int = 256) -> torch.Tensor | dict:
        x = as_batch(images, self.cfg.size)
        was = self.training
        self.eval()
        try:
            outs = [fn(x[i:i + batch]) for i in range(0, len(x), batch)]
        finally:
            self.train(was)
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)

    def predict(self, images) -> list[dict[str, str]]:
        logits = self._run(images, self.forward)
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        n = len(next(iter(idx.values())))
        return [{k: VOCAB[k][idx[k][i]] for k in ATTRIBUTES} for i in range(n)]

    def attribute_accuracy(self, images, targets: Sequence[Attributes | Mapping[str, str] | str]) -> dict[str, float]:
        """Per-attribute accuracy over the images whose target states that attribute, and "mean": the
        mean of those accuracies. A `str` target is a prompt, parsed with `parse_caption`."""
        preds = self.predict(images)
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} images but {len(targets)} targets")
        hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTES}
        for p, t in zip(preds, targets):
            labels = _labels(t)
            for k, v in labels.items():
                hits[k].append(p[k] == v)
        acc = {k: float(np.mean(h)) for k, h in hits.items() if h}
        acc["mean"] = float(np.mean(list(acc.values()))) if acc else float("nan")
        return acc

    def feature_stats(self, images) -> tuple[np.ndarray, np.ndarray]:
        f = self._run(images, self.features).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    def reference_stats(self, count: int = 1000, seed: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """Feature statistics of `count` real base-world samples (a seed range the training never used)."""
        images, _ = sample_world(count, seed, self.cfg.size)
        return self.feature_stats(images)

    def frechet_distance(self, images, reference: tuple[np.ndarray, np.ndarray] | None = None) -> float:
        ref = reference if reference is not None else self.reference_stats()
        return frechet_distance(*self.feature_stats(images), *ref)

    def score(self, images, targets=None, reference=None, reference_images=None) -> dict[str, float]:
        """All the scores in one dict: acc_<attribute> and acc_mean (when targets are given), fd, sharpness
        and sharpness_ratio (to `reference_images`, default real world samples)."""
        out: dict[str, float] = {}
        if targets is not None:
            out.update({f"acc_{k}": v for k, v in self.attribute_accuracy(images, targets).items()})
        out["fd"] = self.frechet_distance(images, reference)
        if reference_images is None:
            reference_images, _ = sample_world(len(as_batch(images, self.cfg.size)), 10_000, self.cfg.size)
        out["sharpness"] = sharpness(images)
        out["sharpness_ratio"] = out["sharpness"] / sharpness(reference_images)
        return out


def _labels(t: Attributes | Mapping[str, str] | str) -> dict[str, str]:
    if isinstance(t, Attributes):
        return t.labels()
    if isinstance(t, str):
        return parse_caption(t)
    return {k: v for k, v in t.items() if k in VOCAB}


def as_batch(images, size: int | None = None) -> torch.Tensor:
    """float (N, 3, H, W) in [0, 1] from a tensor/array of that layout or uint8 (N, H, W, 3)."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        else:
            x = torch.from_numpy(np.asarray(images, np.float32))
    elif isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            x = images.detach().cpu().permute(0, 3, 1, 2).float() / 255.0
        else:
            x = images.detach().float().cpu()
    else:
        return as_batch(np.stack([np.asarray(i) for i in images]), size)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) or uint8 (N, H, W, 3) images, got {tuple(x.shape)}")
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- metrics

def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh((c1 + c1.T) / 2)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1 @ c2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)


def sharpness(images) -> float:
    """Mean squared Laplacian of the luminance (interior pixels), images in [0, 1]: the library's validation
    metric (`dopsd.validation.laplacian_energy`), so that a training run's figures and the world's agree."""
    from dopsd.validation import laplacian_energy

    return laplacian_energy(as_batch(images))


def gaussian_blur(images, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding): the symptom the sharpness score is meant to catch."""
    x = as_batch(images)
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


# ---------------------------------------------------------------------------------------------- training

def _targets(attrs: Iterable[Attributes]) -> dict[str, torch.Tensor]:
    attrs = list(attrs)
    return {k: torch.tensor([VOCAB[k].index(getattr(a, k)) for a in attrs]) for k in ATTRIBUTES}


def train_evaluator(seed: int = 0, steps: int = 800, batch_size: int = 64, num_train: int = 4000,
                    lr: float = 3e-3, cfg: EvaluatorConfig = EvaluatorConfig(), log_every: int = 0) -> WorldEvaluator:
    """Train a `WorldEvaluator` from scratch on `num_train` world samples (all textures, the held-out
    concept's included), `steps` Adam steps; a pure function of its arguments and the thread count."""
    settings = TrainSettings(seed, steps, batch_size, num_train, lr)
    images, attrs = sample_world(num_train, seed, cfg.size, held_out=None, textures=TEXTURES)
    x = as_batch(images)
    y = _targets(attrs)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WorldEvaluator(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, num_train, (batch_size,), generator=gen)
        logits = model(x[idx])
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.1f}s)")
    model.eval()
    model.train_settings = settings
    return model


def save_evaluator(model: WorldEvaluator, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)), "vocab": json.dumps(VOCAB)}
    if getattr(model, "train_settings", None) is not None:
        meta["train"] = json.dumps(asdict(model.train_settings))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def load_evaluator(path: str | Path) -> WorldEvaluator:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a world evaluator ({meta.get('format')!r})")
    if json.loads(meta["vocab"]) != {k: list(v) for k, v in VOCAB.items()}:
        raise ValueError(f"{path}: trained on a different attribute vocabulary")
    model = WorldEvaluator(EvaluatorConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    if "train" in meta:
        model.train_settings = TrainSettings(**json.loads(meta["train"]))
    return model.eval()


__all__ = ["EvaluatorConfig", "WorldEvaluator", "as_batch", "frechet_distance", "gaussian_blur", "load_evaluator",
           "save_evaluator", "sharpness", "train_evaluator"]
