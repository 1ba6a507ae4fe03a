"""Few-step quality during training: metrics of the tuned model's samples at its native step count.

Plain SFT of a step-distilled model keeps the loss going down while its few-step samples go soft; a loss curve
does not show that, samples scored every N steps do. `validation.metrics` names the metrics; every
`validation.metric_every` steps (and before the first step and after the last) the trainer samples
`validation.metric_prompts` x `validation.metric_seeds` at `validation.steps` (0: the roll-out's step count,
the model's native budget) with the tuned model, and gives the images, together with the base model's samples
of the same prompts, seeds and steps (drawn once, before training), to each metric. The figures go to
log.jsonl (`{"event": "validation", "step": N, "val.<name>": x}`), TensorBoard / W&B as scalars, and a plot of
all of them to `<run>/validation.png`.

A metric is any callable `metric(samples: Samples) -> dict[str, float]`. Built in:
- `sharpness`: mean squared Laplacian of the luminance, as a ratio to the base model's samples (below 1: blur).
- `base_distance`: pixel-space RMSE (images in [0, 1]) between the tuned and the base model's samples of the
  same prompt and noise: how far tuning moved what the model draws for old prompts.
- `features=DIR`: a local vision model (a transformers `AutoModel` directory with its image processor,
  safetensors weights, no remote code): 1 - cosine similarity of tuned vs base embeddings, per pair, averaged.
- `package.module:name`: a metric of your own; `name` is a callable taking `Samples`, or a class built with no
  arguments whose instances are (the miniature world's evaluator is `dopsd_world.validation:WorldMetric`).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .config import ConfigError

BUILT_IN = ("sharpness", "base_distance", "features=DIR")


@dataclass
class Samples:
    """What a metric sees: prompt-major (len(prompts) * len(seeds), 3, H, W) images in [0, 1]."""
    images: torch.Tensor  # the tuned model's samples
    base: torch.Tensor  # the base model's, same prompts, seeds and steps
    prompts: list[str]
    seeds: list[int]
    steps: int  # sampling steps (NFE) both were drawn with
    step: int  # the training step


class Metric(Protocol):
    def __call__(self, samples: Samples) -> dict[str, float]: ...


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def laplacian_energy(x: torch.Tensor) -> float:
    """Mean squared Laplacian of the luminance over interior pixels; x: (N, 3, H, W) in [0, 1]."""
    x = x.detach().float().cpu()
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return float(F.conv2d(lum, _LAPLACIAN).pow(2).mean())


def sharpness(samples: Samples) -> dict[str, float]:
    tuned, base = laplacian_energy(samples.images), laplacian_energy(samples.base)
    return {"sharpness": tuned, "sharpness_ratio": tuned / max(base, 1e-12)}


def base_distance(samples: Samples) -> dict[str, float]:
    diff = (samples.images.float() - samples.base.float()).flatten(1)
    return {"base_rmse": float(diff.pow(2).mean(1).sqrt().mean())}


class FeatureDistance:
    """Embeddings of a local vision model: 1 - cos(tuned, base) per sample pair, averaged."""

    def __init__(self, path: str):
        if not Path(path).is_dir():
            raise ConfigError(f"validation.metrics: features={path}: not a directory (a local transformers vision "
                              f"model with its preprocessor_config.json)")
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"validation.metrics: features={path} does not load: {e}") from None

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.processor(images=list(images.float().clamp(0, 1)), return_tensors="pt", do_rescale=False)
        out = self.model(pixel_values=inputs["pixel_values"].to(self.model.dtype))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = getattr(out, "image_embeds", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(1)
        return pooled.float().flatten(1)

    def __call__(self, samples: Samples) -> dict[str, float]:
        cos = F.cosine_similarity(self.embed(samples.images), self.embed(samples.base), dim=1)
        return {"feature_distance": float((1 - cos).mean())}


def parse_metric(spec: str) -> tuple[str, str]:
    """(kind, argument) of a metric spec, or ConfigError: sharpness | base_distance | features=DIR | module:name."""
    if spec in ("sharpness", "base_distance"):
        return spec, ""
    if spec.startswith("features="):
        if not spec[len("features="):]:
            raise ConfigError("validation.metrics: features=DIR needs the model directory")
        return "features", spec[len("features="):]
    module, sep, name = spec.partition(":")
    if sep and all(part.isidentifier() for part in module.split(".")) and name.isidentifier():
        return "plugin", spec
    raise ConfigError(f"validation.metrics: unknown metric {spec!r}; built in: {', '.join(BUILT_IN)}, or "
                      f"package.module:callable for your own")


def build_metric(spec: str) -> Callable[[Samples], dict[str, float]]:
    kind, arg = parse_metric(spec)
    if kind == "sharpness":
        return sharpness
    if kind == "base_distance":
        return base_distance
    if kind == "features":
        return FeatureDistance(arg)
    module, _, name = arg.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"validation.metrics: {spec} does not import: {e}") from None
    metric = obj() if isinstance(obj, type) else obj
    if not callable(metric):
        raise ConfigError(f"validation.metrics: {spec} is not callable")
    return metric


def evaluate(metrics: dict[str, Callable], samples: Samples) -> dict[str, float]:
    """One validation record's figures: `val.<key>` for each figure every metric returns."""
    out: dict[str, float] = {}
    for spec, metric in metrics.items():
        for key, value in metric(samples).items():
            name = f"val.{key}"
            if name in out:
                raise ValueError(f"validation.metrics: {spec} reports {key}, which another metric reported too")
            out[name] = float(value)
    return out


def plot_history(log_path: Path, out_path: Path) -> Path | None:
    """`validation.png`: each `val.*` figure of log.jsonl's validation records against the training step."""
    records = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "validation":
            records.append(record)
    keys = sorted({k for r in records for k in r if k.startswith("val.")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = sorted((r["step"], r[key]) for r in records if key in r)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(key[len("val."):])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
