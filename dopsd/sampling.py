"""Few-step sampling with the backend's own Euler roll-out, and PNG grids."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .schedule import euler_step


@torch.no_grad()
def rollout(backend: Any, transformer: torch.nn.Module, context: Any, noise: torch.Tensor,
            sigmas: list[float]) -> torch.Tensor:
    """Deterministic K-step Euler ODE from `noise` along `sigmas`; returns the final latents (float32)."""
    x = noise.float()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, backend.velocity(transformer, x, s, context).float(), s, s_next)
    return x


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """CPU-drawn noise so that a seed gives the same image on every device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def generate(backend: Any, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], height: int,
             width: int, num_steps: int, references: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Images in [0, 1], ordered prompt-major: (len(prompts) * len(seeds), 3, H, W). `references`: (3, H_i, W_i)
    input images given with every prompt (editing: the prompts are instructions), as `pipeline(image=[...])`."""
    shape = backend.latent_shape(1, height, width)
    sigmas = backend.sigmas(num_steps, shape)
    refs = {"references": [r.unsqueeze(0).to(backend.device) for r in references]} if references else {}
    images = []
    for prompt in prompts:
        context = backend.encode_student([prompt], **refs)
        for seed in seeds:
            latents = rollout(backend, transformer, context, seeded_noise(shape, seed).to(backend.device), sigmas)
            images.append(backend.decode_latents(latents).cpu())
    return torch.cat(images)


@torch.no_grad()
def sample_batch(backend: Any, transformer: torch.nn.Module, prompts: list[str], seeds: list[int], num_steps: int,
                 size: int, images: torch.Tensor | None = None, batch: int = 64) -> torch.Tensor:
    """Square `size` images in [0, 1], image i from prompt i and noise seed i, `batch` at a time (evaluations);
    with `images`, the teacher context (prompt + that image) instead of the student's."""
    shape = backend.latent_shape(1, size, size)
    sigmas = backend.sigmas(num_steps, shape)
    out = []
    for start in range(0, len(prompts), batch):
        sl = slice(start, start + batch)
        ctx = backend.encode_student(prompts[sl]) if images is None else backend.encode_teacher(prompts[sl], images[sl])
        noise = torch.cat([seeded_noise(shape, seed) for seed in seeds[sl]]).to(backend.device)
        out.append(backend.decode_latents(rollout(backend, transformer, ctx, noise, sigmas)).cpu())
    return torch.cat(out)


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def grid(blocks: list[torch.Tensor], rows: int, pad: int = 2, gap: int = 6) -> Image.Image:
    """Lay out blocks side by side (e.g. base | tuned), each block a (rows * cols, 3, H, W) prompt-major
    tensor; blocks are separated by a wider white gap."""
    cols = [b.shape[0] // rows for b in blocks]
    h, w = blocks[0].shape[-2:]
    width = sum(c * (w + pad) for c in cols) + gap * (len(blocks) - 1) + pad
    height = rows * (h + pad) + pad
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x0 = pad
    for block, ncol in zip(blocks, cols):
        for i in range(block.shape[0]):
            r, c = divmod(i, ncol)
            y, x = pad + r * (h + pad), x0 + c * (w + pad)
            canvas[y:y + h, x:x + w] = np.asarray(to_pil(block[i]))
        x0 += ncol * (w + pad) + gap
    return Image.fromarray(canvas)


def save_grid(blocks: list[torch.Tensor], rows: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(blocks, rows).save(path)
    return path
