"""The trainer: builds the pieces from a Config and runs `train_step` in a loop.

It knows the backend only through its protocol (dopsd/models/base.py) and the objective only through
`dopsd_objective` / `sft_objective`.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import Config, dump_config
from .data.folder import FolderDataset, collate
from .engine import TorchEngine
from .metrics import PHASES, RunLog, StepTimer
from .models import load_backend, make_tiny_model
from .objectives import dopsd_objective, sft_objective
from .sampling import generate, save_grid
from .teacher import STUDENT, TEACHER, EmaTeacher, set_active_adapter

log = logging.getLogger("dopsd")

MAX_BAD_STEPS = 20  # consecutive non-finite steps before the run stops (weights are never updated by them)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is available")
    return torch.device(name)


def add_lora_adapters(transformer: torch.nn.Module, rank: int, alpha: float, targets: list[str],
                      init: str, with_teacher: bool) -> None:
    """The student adapter (trained) and, for D-OPSD, a teacher adapter of the same shape (no grad)."""
    from peft import LoraConfig

    init_weights = "gaussian" if init == "gaussian" else False
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init_weights)
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=STUDENT)
    if with_teacher:
        with warnings.catch_warnings():  # peft warns on any second adapter; two are the design here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(config, adapter_name=TEACHER)
    for name, p in transformer.named_parameters():
        p.requires_grad_(f".{STUDENT}." in name)
    set_active_adapter(transformer, STUDENT)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.run_dir = Path(cfg.output.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self._log_handler = _log_to_file(self.run_dir / "train.log")
        torch.manual_seed(cfg.train.seed)

        model_dir = Path(cfg.model.path)
        if not model_dir.exists():
            if not cfg.model.make_tiny_if_missing:
                raise FileNotFoundError(f"model.path: {model_dir} does not exist")
            log.info("building the tiny %s checkpoint at %s", cfg.model.backend, model_dir)
            make_tiny_model(cfg.model.backend, str(model_dir), seed=cfg.model.tiny_seed)
        self.backend = load_backend(cfg.model, device=str(self.device))
        self.student = self.backend.transformer

        t = cfg.train
        self.teacher = None
        if t.mode == "lora":
            add_lora_adapters(self.student, cfg.lora.rank, cfg.lora.alpha,
                              cfg.lora.targets or self.backend.lora_targets, cfg.lora.init,
                              with_teacher=t.objective == "dopsd")
            if t.objective == "dopsd":
                self.teacher = EmaTeacher.for_lora(self.student, t.ema_decay)
        else:
            self.student.requires_grad_(True)
            if t.objective == "dopsd":
                self.teacher = EmaTeacher.for_full(self.student, t.ema_decay)
        self.student.train()
        if cfg.model.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()

        params = [p for p in self.student.parameters() if p.requires_grad]
        self.engine = TorchEngine(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  weight_decay=t.weight_decay, grad_clip=t.grad_clip)
        self.num_trainable = sum(p.numel() for p in params)

        height, width = cfg.data.resolution
        self.dataset = FolderDataset(cfg.data.path, height, width, cfg.data.placeholder,
                                     cfg.data.placeholder_replacement, seed=t.seed)
        if self.dataset.num_skipped:
            log.warning("data: skipped %d bad samples %s", self.dataset.num_skipped, dict(self.dataset.skipped))
        latent_shape = self.backend.latent_shape(t.batch_size, height, width)
        self.sigmas = list(t.sigmas) or self.backend.sigmas(t.rollout_steps, latent_shape)
        # A dedicated generator makes the roll-out noise reproducible from the seed alone.
        self.generator = torch.Generator().manual_seed(t.seed)
        self.timer = StepTimer(sync_cuda=self.device.type == "cuda")
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self._base_samples: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, batch: dict) -> dict:
        t = self.cfg.train
        images = batch["image"].to(self.device)
        prompts = batch["prompt"]
        self.engine.zero_grad()
        with self.timer("objective"):
            if t.objective == "dopsd":
                result = dopsd_objective(self.backend, self.student, self.teacher, prompts, images, self.sigmas,
                                         self.engine.backward, self.generator, loss_space=t.loss_space,
                                         per_step_backward=t.backward == "per_step", timer=self.timer,
                                         autocast=self.autocast)
            else:
                result = sft_objective(self.backend, self.student, prompts, images, self.engine.backward,
                                       self.generator, sigma_sampling=t.sft_sigma_sampling, timer=self.timer,
                                       autocast=self.autocast)
        with self.timer("optimizer"):
            finite = math.isfinite(result.loss)
            grad_norm, applied = self.engine.step() if finite else (float("nan"), False)
            if not finite:
                self.engine.zero_grad()
            if applied and self.teacher is not None:
                self.teacher.update()
        self.step += 1
        record = {"step": self.step, "loss": result.loss, "grad_norm": grad_norm, "lr": self.engine.lr}
        if t.objective == "dopsd":
            record.update({f"loss_k{k}": v for k, v in enumerate(result.terms)})
        if not applied:
            self.skipped_steps += 1
            self.bad_steps += 1
            record["skipped_nonfinite"] = True
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped",
                        self.step, result.loss, grad_norm)
        else:
            self.bad_steps = 0
        return record

    # ------------------------------------------------------------------------------------------------
    def _batches(self):
        cfg = self.cfg
        loader_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=cfg.train.batch_size, shuffle=cfg.data.shuffle, drop_last=False,
                num_workers=cfg.data.num_workers, collate_fn=collate, generator=loader_gen)
            yield from loader
            epoch += 1

    def validation_images(self) -> torch.Tensor | None:
        v = self.cfg.validation
        if not v.prompts:
            return None
        height, width = v.resolution or self.cfg.data.resolution
        was_training = self.student.training
        self.student.eval()
        with self.autocast():
            images = generate(self.backend, self.student, v.prompts, v.seeds, height, width,
                              v.steps or self.cfg.train.rollout_steps)
        self.student.train(was_training)
        return images

    def save_samples(self, name: str) -> Path | None:
        """PNG grid: one row per validation prompt; left block base model, right block tuned, same seeds."""
        tuned = self.validation_images()
        if tuned is None:
            return None
        return save_grid([self._base_samples, tuned], len(self.cfg.validation.prompts),
                         self.run_dir / "samples" / f"{name}.png")

    def save(self, name: str) -> Path:
        out = self.run_dir / "checkpoints" / name
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.train.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.student, adapter_name=STUDENT)
            meta = self.student.peft_config[STUDENT].to_dict()
            meta["target_modules"] = sorted(meta["target_modules"])  # a set: sorted for reproducible files
            self.backend.save_lora(state, meta, out)
        else:
            self.backend.save_transformer(self.student, out)
        log.info("saved %s", out)
        return out

    def fit(self) -> dict:
        cfg = self.cfg
        run_log = RunLog(self.run_dir, tensorboard=cfg.output.tensorboard)
        log.info("run %s: %s, %s, %d trainable parameters, sigmas %s", self.run_dir, cfg.train.objective,
                 cfg.train.mode, self.num_trainable, [round(s, 4) for s in self.sigmas])
        self._base_samples = self.validation_images()
        run_log.write({"event": "start", "trainable_params": self.num_trainable, "sigmas": self.sigmas,
                       "data_samples": len(self.dataset), "data_skipped": dict(self.dataset.skipped)})
        totals = {p: 0.0 for p in PHASES}
        bar = _progress(cfg.train.steps, cfg.output.progress_bar)
        batches = self._batches()
        t_start = time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                with self.timer("data"):
                    batch = next(batches)
                record = self.train_step(batch)
                phases = self.timer.reset()
                objective = phases.pop("objective")
                # roll-out = the objective's own work around the model calls (noise, Euler updates, losses)
                phases["rollout"] = max(0.0, objective - sum(phases.get(p, 0.0) for p in
                                                               ("encode", "teacher", "student", "backward")))
                for p in PHASES:
                    totals[p] += phases.get(p, 0.0)
                record["step_time"] = time.perf_counter() - t0
                record.update({f"time.{p}": phases.get(p, 0.0) for p in PHASES})
                if self.step % cfg.output.log_every == 0 or self.step == cfg.train.steps:
                    run_log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", s_it=f"{record['step_time']:.2f}")
                bar.update(1)
                if self.bad_steps >= MAX_BAD_STEPS:
                    raise FloatingPointError(f"{self.bad_steps} consecutive non-finite steps; stopping "
                                             f"(no bad update was applied). Lower train.lr or check the data.")
                if cfg.output.save_every and self.step % cfg.output.save_every == 0 and self.step < cfg.train.steps:
                    self.save(f"step_{self.step:06d}")
                if cfg.validation.every and self.step % cfg.validation.every == 0 and self.step < cfg.train.steps:
                    self.save_samples(f"step_{self.step:06d}")
        except KeyboardInterrupt:
            log.warning("interrupted at step %d; saving", self.step)
            self.save(f"interrupted_step_{self.step:06d}")
            raise
        finally:
            bar.close()
        wall = time.perf_counter() - t_start
        final = self.save("final")
        grid = self.save_samples("final")
        steps = max(self.step, 1)
        split = {p: totals[p] / steps for p in PHASES}
        summary = {"event": "end", "steps": self.step, "wall_time": wall, "skipped_steps": self.skipped_steps,
                   "data_skipped": dict(self.dataset.skipped), "mean_step_time": wall / steps,
                   **{f"mean_time.{p}": v for p, v in split.items()}, "final": str(final),
                   "samples": str(grid) if grid else None}
        run_log.write(summary)
        run_log.close()
        log.info("done: %d steps in %.1fs; mean per step: %s", self.step, wall,
                 ", ".join(f"{p} {v * 1000:.1f}ms" for p, v in split.items()))
        if self.dataset.num_skipped:
            log.info("skipped %d bad samples: %s", self.dataset.num_skipped, dict(self.dataset.skipped))
        logging.getLogger().removeHandler(self._log_handler)
        self._log_handler.close()
        return summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _log_to_file(path: Path) -> logging.Handler:
    """Mirror every log record of this process into the run directory until the run ends."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
