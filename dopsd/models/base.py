"""The backend protocol: everything the trainer needs from a model family, and nothing more.

The trainer never looks inside a backend. Contexts are opaque objects that a backend makes and consumes.
Velocities follow one convention everywhere: v = noise - data, so x0 = x - sigma * v and an Euler step is
x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backend(Protocol):
    name: str
    transformer: nn.Module  # the network G that is trained (student) and, in LoRA mode, hosts the teacher adapter
    device: torch.device

    # --- conditioning (frozen encoders; called under no_grad) ---
    # `references` (editing data): one (B, 3, H_i, W_i) tensor in [0, 1] per reference slot, the i-th input
    # image of every sample of the batch (samples are bucketed so that slot sizes agree). None or [] means
    # text-to-image. Backends without an image-conditioning path raise ValueError (`refuse_references`).
    def encode_student(self, prompts: list[str], references: list[torch.Tensor] | None = None) -> Any:
        """What inference sees: the prompt (and the reference images of an editing sample)."""

    def encode_teacher(self, prompts: list[str], images: torch.Tensor,
                       references: list[torch.Tensor] | None = None) -> Any:
        """Privileged context: prompt + target image (images in [0, 1], shape (B, 3, H, W)), after the
        student's references when there are any."""

    def loaded_encoders(self) -> list[str]:
        """The conditioning encoders loaded so far, by name ("text_encoder", "teacher_encoder"). A backend may
        load an encoder on first use: a run whose samples all carry cached features then loads none."""

    # --- the network ---
    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: float | torch.Tensor,
                 context: Any) -> torch.Tensor:
        """v = noise - data predicted by `transformer` at state x (B, C, h, w); sigma is a float or (B,)."""

    def dual_velocity(self, teacher_model: nn.Module, student_model: nn.Module, x: torch.Tensor,
                      sigma: float | torch.Tensor, c_teacher: Any, c_student: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_teacher, v_student) at state x in one fused pass of the DiT (`train.dual_forward: fused`,
        dual.py): equal to `velocity` with the teacher (no grad) and with the student, but each layer is called
        once for both roles. `teacher_model` is `student_model` in LoRA mode (two adapters, one network)."""

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        ...

    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...], schedule: str = "pipeline") -> list[float]:
        """K+1 descending sigmas ending at 0. schedule="pipeline" (the default, used for sampling): the model's
        inference pipeline's few-step schedule; "recipe": the authors' training schedule (`train.schedule`);
        anything else raises ValueError."""

    def schedule_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The time-shift factor the model's schedule applies (used to draw SFT noise levels)."""

    # --- pixels <-> latents ---
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W)."""

    # --- LoRA and export ---
    lora_targets: list[str]

    def save_lora(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: Path) -> Path:
        """Write a diffusers-format LoRA (loadable with the family's pipeline `load_lora_weights`);
        `metadata` is the peft LoraConfig as a dict (rank, alpha, targets)."""

    def apply_kernels(self, transformer: nn.Module) -> int:
        """Patch dopsd_kernels' fused ops into the network's blocks in place; returns modules patched."""

    def repeated_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The DiT's repeated blocks, in forward order (what `model.compile` compiles one by one: Z-Image's
        noise_refiner, context_refiner and layers; FLUX.2's double and single blocks)."""

    attention: Any  # `dopsd.models.attention.Attention`: the kernels `model.attention` resolved to

    def load_lora(self, transformer: nn.Module, path: str | Path, adapter_name: str = "lora") -> None:
        """Load a LoRA written by `save_lora` (or by any diffusers-compatible trainer)."""

    def read_lora(self, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A diffusers-format LoRA's tensors, named as peft names them in the transformer (`<module>.lora_A.weight`,
        without the adapter name), and its rank/alpha metadata (empty if the file has none)."""

    def new_transformer(self) -> nn.Module:
        """A fresh copy of the trained network at its pretrained weights, built by the same loader (the full
        fine-tune teacher under ZeRO-3, where the live model cannot be deep-copied)."""

    def save_transformer(self, transformer: nn.Module, out_dir: Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write full transformer weights in the diffusers `save_pretrained` layout (safetensors); with
        `state_dict`, those tensors (consolidated from shards) instead of the module's own."""


@runtime_checkable
class TeacherEncoderBackend(Backend, Protocol):
    """A backend whose teacher can read the target image through a separate vision-language encoder
    (Z-Image's Qwen3-VL front-end, grafted onto the text encoder), or as a clean reference in the DiT's sequence.
    The feature methods are `encode_student` / `encode_teacher` without no_grad, for callers that train the
    encoders (the miniature world's toy-base builder); the trainer needs none of this."""
    teacher_context: str             # the route `encode_teacher` takes: "vlm" or "reference"
    teacher_pixels: tuple[int, int]  # (min, max) pixels of the image the vision encoder is given

    def student_features(self, prompts: list[str]) -> Any:
        ...

    def vlm_features(self, prompts: list[str], images: torch.Tensor) -> Any:
        ...

    def reference_features(self, prompts: list[str], images: torch.Tensor) -> Any:
        ...

    def teacher_encoder(self) -> tuple[nn.Module, Any, Any]:
        """(vision-language model, tokenizer, image processor), loaded on first use."""

    def set_teacher_encoder(self, model: nn.Module, tokenizer: Any, image_processor: Any) -> None:
        """Use this encoder (already grafted onto the text encoder, on the backend's device) instead of
        loading one."""


def refuse_references(backend: str, references: list[torch.Tensor] | None) -> None:
    """For backends that condition on text only: editing data must fail loudly, not train as text-to-image."""
    if references:
        raise ValueError(f"model.backend {backend}: reference images (editing data) are not supported by this "
                         f"backend; the editing task needs flux2_klein (or data without NAME.refN images)")
