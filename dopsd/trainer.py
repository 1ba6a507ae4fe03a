"""The trainer: builds the pieces from a Config and runs `train_step` in a loop.

It knows the backend only through its protocol (dopsd/models/base.py), the engine through the surface in
engine.py, and the objective through `objectives.OBJECTIVES[train.objective]` (a StepContext built once, a
StepBatch per step). The same code runs one process
(torch engine) and N ranks (DeepSpeed ZeRO-2/3); every rank makes the same model calls in the same order.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, dump_config
from .data import DataError, build_data
from .data.references import reference_tensors
from .data.sampler import sample_seed
from .dist import all_gather_object, all_mean, all_true, barrier, device_for, init_distributed
from .engine import build_engine
from .metrics import PHASES, RunLog, StepTimer, check_trackers
from .models import check_model_paths, load_backend, make_tiny_model
from .objectives import OBJECTIVES, StepBatch, StepContext, StepResult, distill_loss
from .preemption import Interrupted, Preempted, StopSignals
from .sampling import generate, save_grid
from .adapters import add_lora_adapters, merge_lora, student_lora, student_params
from .check import data_summary, needs_live_teacher, per_step_batch
from .checkpoint import plan_resume
from .teacher import EmaTeacher
from .validation import Samples, build_metric, evaluate, plot_history

log = logging.getLogger("dopsd")

MAX_BAD_STEPS = 20  # consecutive steps without an applied update before the run stops


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        use_ds = cfg.engine.type == "deepspeed"
        self.info = init_distributed(cfg.engine.dist_backend, timeout_s=cfg.engine.rendezvous_timeout_s,
                                     deepspeed=use_ds)
        self.is_main = self.info.is_main
        self.device = device_for(self.info, t.device)
        self.run_dir = Path(cfg.output.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self._log_handler = _log_to_file(self.run_dir / "train.log") if self.is_main else None
        if not self.is_main:  # one voice per job: other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)
        torch.manual_seed(t.seed)

        # Everything that can be checked without model weights is checked first: a mistake in the data, a path
        # or the checkpoint to resume costs seconds, not the load of a large model.
        model_dir = Path(cfg.model.path)
        if self.is_main and not model_dir.exists():
            if not cfg.model.make_tiny_if_missing:
                raise FileNotFoundError(f"model.path: {model_dir} does not exist")
            log.info("building the tiny %s checkpoint at %s", cfg.model.backend, model_dir)
            make_tiny_model(cfg.model.backend, str(model_dir), seed=cfg.model.tiny_seed)
        barrier()
        self.objective = OBJECTIVES[t.objective]
        check_model_paths(cfg.model, teacher_encoder=needs_live_teacher(cfg))
        check_trackers(cfg.output)
        ds_config = None
        if use_ds:
            from .engine_deepspeed import build_ds_config

            ds_config = build_ds_config(cfg)
        # With gradient accumulation the data source serves every optimizer step's samples at once (grad_accum x
        # batch_size per rank) and train_step splits them: positions, checkpoints and per-sample noise then name
        # the same samples as a run with batch_size x grad_accum.
        self.data = build_data(per_step_batch(cfg), self.info.rank, self.info.world_size)
        if self.is_main:  # what `dopsd train --check` reports: counts per dataset, sizes, the bad files
            (log.warning if self.data.skipped else log.info)("data: %s", data_summary(self.data.describe()))
        self._resume_from = plan_resume(cfg, self.ckpt_root, self.info.rank, self.info.world_size)

        loader = self._editable = None
        if ds_config is not None and ds_config["zero_optimization"].get("stage", 0) >= 3:
            from .engine_deepspeed import gathered_for_edit, zero3_transformer_loader

            loader, self._editable = zero3_transformer_loader(ds_config), gathered_for_edit
        self.backend = load_backend(cfg.model, device=str(self.device), transformer_loader=loader)
        module = self.backend.transformer
        self._merge_loras(module)

        self.teacher = None
        if t.mode == "lora":
            # Seeded here: how the base was built (from_pretrained, or initialised under zero.Init) must not
            # change the adapter's random init, which must also be equal on every rank.
            torch.manual_seed(t.seed)
            add_lora_adapters(module, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets or self.backend.lora_targets,
                              cfg.lora.init, with_teacher=self.objective.needs_teacher)
            if self.objective.needs_teacher:
                self.teacher = EmaTeacher.for_lora(module, t.ema_decay)
        else:
            module.requires_grad_(True)
        self.kernels, fused_loss = self._kernel_choice()
        self.loss_fn = distill_loss
        if fused_loss:
            from dopsd_kernels import distill_loss as fused_distill_loss

            self.loss_fn = fused_distill_loss
        if self.kernels:
            patched = self.backend.apply_kernels(module)
            if self.is_main:
                log.info("Triton kernels patched into %d modules", patched)
        if cfg.model.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        if cfg.model.compile:  # after adapters, kernels and checkpointing: it compiles the blocks as they are now
            from .models.compile import compile_blocks

            compiled = compile_blocks(self.backend, module)
            if self.is_main:
                log.info("torch.compile: %d blocks compiled (run by the separate path, SFT and sampling)", compiled)
        module.train()

        self.engine = build_engine(cfg, module, ds_config)
        self.model = self.engine.model  # what forwards go through (the DeepSpeed engine wraps the module)
        self.module = self.engine.module
        if self.teacher is not None:
            self.teacher.model = self.model
        elif self.objective.needs_teacher:  # full fine-tune: the teacher is a frozen twin, placed like the model
            twin = None
            if self.engine.zero_stage >= 3:  # cannot deep-copy a sharded module: build a sharded twin
                twin = self.backend.new_transformer()
                self._merge_loras(twin)
                if self.kernels:
                    self.backend.apply_kernels(twin)
                twin = self.engine.wrap_frozen(twin)
            self.teacher = EmaTeacher.for_full(self.module, t.ema_decay, twin)
        if self.teacher is not None:
            self.teacher.use_local_view(self.engine.local)
        self.num_trainable = sum(_numel(p) for p in self.engine.named_params.values())
        self.timer = StepTimer(sync_cuda=self.device.type == "cuda")
        self.step_context = StepContext(
            backend=self.backend, student=self.model, teacher=self.teacher, backward=self._backward,
            timer=self.timer, autocast=self.autocast, finite=self._finite, loss_fn=self.loss_fn,
            loss_space=t.loss_space, per_step_backward=t.backward == "per_step",
            sft_sigma_sampling=t.sft_sigma_sampling, dual_forward=t.dual_forward)

        height, width = cfg.data.resolution
        latent_shape = self.backend.latent_shape(t.batch_size, height, width)
        self.sigmas = list(t.sigmas) or self.backend.sigmas(t.rollout_steps, latent_shape, schedule=t.schedule)
        self._sigmas_by_size = {(height, width): self.sigmas}  # aspect-ratio buckets: schedules by batch size
        self.step = 0
        self.position: dict = {}  # where the data source continues from (stored in checkpoints)
        self.bad_steps = 0
        self.skipped_steps = 0
        self.truncated_steps = 0
        self._base_samples: torch.Tensor | None = None
        self._metric_base: torch.Tensor | None = None
        # {spec: metric}, on rank 0 only (every rank samples, rank 0 scores)
        self.metrics = {spec: build_metric(spec) for spec in cfg.validation.metrics} if self.is_main else {}
        self._sampled: tuple = ()  # (key, images) of the last validation_images call: grid and metrics share it
        self.run_log: RunLog | None = None  # rank 0, from the start of fit()

    def _merge_loras(self, module: torch.nn.Module) -> None:
        """Continual tuning: `model.merge_loras` added into the DiT's weights, in order, before any adapter."""
        for path in self.cfg.model.merge_loras:
            state, meta = self.backend.read_lora(path)
            n = merge_lora(module, state, meta, str(path), editable=self._editable)
            if self.is_main:
                log.info("merged LoRA %s into %d modules of the base", path, n)

    def _kernel_choice(self) -> tuple[bool, bool]:
        """(patch the DiT blocks, use the loss kernel): `always`, `never`, or on CUDA with `auto` what the
        measured table in dopsd_kernels.measured says wins on this GPU class (nothing, for an unmeasured one)."""
        kernels = self.cfg.model.kernels
        if kernels != "auto":
            return (kernels == "always",) * 2
        if self.device.type != "cuda":
            return False, False
        from dopsd_kernels.measured import auto_choice

        blocks, loss, why = auto_choice(self.backend.name, torch.cuda.get_device_name(self.device),
                                        self.cfg.train.loss_space)
        if self.is_main:
            log.info("model.kernels=auto: %s", why)
        return blocks, loss

    # ------------------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _generators(self) -> list[torch.Generator]:
        # Noise is named by (seed, step, place in the global batch): independent of rank count and resumes.
        return [torch.Generator().manual_seed(sample_seed(self.cfg.train.seed, self.step, g))
                for g in self.data.global_offsets]

    def _backward(self, loss: torch.Tensor) -> None:
        # each micro-batch's loss is a mean over its samples: / N makes the sum over N of them the mean over all
        self.engine.backward(loss / self.cfg.train.grad_accum if self.cfg.train.grad_accum > 1 else loss)

    @staticmethod
    def _finite(loss: torch.Tensor) -> bool:
        return all_true(bool(torch.isfinite(loss.detach()).all()))

    def _batch_sigmas(self, images: torch.Tensor) -> list[float]:
        """The roll-out schedule at this batch's size (with aspect-ratio buckets, batches differ in size; the
        schedule depends on it for backends with resolution-dependent shifts)."""
        size = (images.shape[-2], images.shape[-1])
        if size not in self._sigmas_by_size:
            shape = self.backend.latent_shape(images.shape[0], *size)
            self._sigmas_by_size[size] = self.sigmas if self.cfg.train.sigmas else \
                self.backend.sigmas(self.cfg.train.rollout_steps, shape,
                                                                       schedule=self.cfg.train.schedule)
        return self._sigmas_by_size[size]

    def train_step(self, batch: dict) -> dict:
        t = self.cfg.train
        images = batch["image"].to(self.device)
        prompts = batch["prompt"]
        # cached encoder features from the data (lists of per-sample tensors), when every sample has them
        cached = {k: [c.to(self.device) for c in batch[k]] for k in ("student_context", "teacher_context")
                  if batch.get(k) is not None}
        # editing data: one (B, 3, H_i, W_i) batch per reference slot, for both encoders
        references = [r.to(self.device) for r in batch.get("references") or []] or None
        sigmas = self._batch_sigmas(images)
        self.engine.zero_grad()
        step_batch = StepBatch(prompts=prompts, images=images, generators=self._generators(), sigmas=sigmas,
                               references=references, **cached)
        lr = self.engine.lr  # the rate this step's update uses (step() advances the schedule)
        results = []
        for micro in step_batch.split(t.grad_accum):  # gradients accumulate; one optimizer step below
            with self.timer("objective"):
                results.append(self.objective(self.step_context, micro))
        result = _merged(results)
        with self.timer("optimizer"):
            applied = False
            grad_norm = float("nan")
            if any(r.backpropagated for r in results):
                grad_norm, applied = self.engine.step()
            else:
                self.engine.zero_grad()
                self.engine.skip_step()
            if applied and self.teacher is not None:
                self.teacher.update()
        self.step += 1
        record = {"step": self.step, "loss": all_mean(result.loss), "grad_norm": grad_norm, "lr": lr}
        if self.objective.term_prefix:
            record.update({f"{self.objective.term_prefix}{k}": all_mean(v) for k, v in enumerate(result.terms)})
        if not applied:
            self.skipped_steps += 1
            self.bad_steps += 1
            record["skipped_nonfinite"] = True
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped",
                        self.step, result.loss, grad_norm)
        else:
            self.bad_steps = 0
            if result.backpropagated < len(result.terms):
                self.truncated_steps += 1
                record["truncated_at_k"] = result.backpropagated
                log.warning("step %d: non-finite loss at roll-out step %d; applied the finite steps before it",
                            self.step, result.backpropagated)
        return record

    # ------------------------------------------------------------------------------------------------
    def validation_images(self, prompts: list[str] | None = None, seeds: list[int] | None = None
                          ) -> torch.Tensor | None:
        """Samples of the model as it is now (default: validation.prompts x seeds), at validation.steps."""
        v = self.cfg.validation
        prompts = v.prompts if prompts is None else prompts
        if not prompts:
            return None
        seeds = v.seeds if seeds is None else seeds
        key = (self.step, tuple(prompts), tuple(seeds))  # the weights change only with the step (or a resume)
        if self._sampled and self._sampled[0] == key:
            return self._sampled[1]
        height, width = v.resolution or self.cfg.data.resolution
        references = reference_tensors(v.references) if v.references else None
        was_training = self.module.training
        self.module.eval()
        with self.autocast():  # every rank samples (ZeRO-3 forwards are collective); rank 0 writes
            images = generate(self.backend, self.model, prompts, seeds, height, width,
                              v.steps or self.cfg.train.rollout_steps, references=references)
        self.module.train(was_training)
        self._sampled = (key, images)
        return images

    def _metric_prompts(self) -> tuple[list[str], list[int]]:
        v = self.cfg.validation
        return v.metric_prompts or v.prompts, v.metric_seeds

    def log_metrics(self, images: torch.Tensor | None = None) -> dict | None:
        """Few-step quality now (collective: every rank samples): `validation.metrics` of the tuned model's
        samples against the base model's, into log.jsonl, the trackers and validation.png (rank 0)."""
        prompts, seeds = self._metric_prompts()
        images = self.validation_images(prompts, seeds) if images is None else images
        if not self.is_main:
            return None
        samples = Samples(images=images, base=self._metric_base, prompts=prompts, seeds=seeds, step=self.step,
                          steps=self.cfg.validation.steps or self.cfg.train.rollout_steps)
        record = {"event": "validation", "step": self.step, **evaluate(self.metrics, samples)}
        self.run_log.write(record)
        plot_history(self.run_log.path, self.run_dir / "validation.png")
        log.info("validation at step %d: %s", self.step,
                 ", ".join(f"{k[4:]} {v:.4g}" for k, v in record.items() if k.startswith("val.")))
        return record

    def save_samples(self, name: str) -> Path | None:
        """PNG grid: one row per validation prompt; left block base model, right block tuned, same seeds."""
        tuned = self.validation_images()
        if tuned is None or not self.is_main:
            return None
        path = save_grid([self._base_samples, tuned], len(self.cfg.validation.prompts),
                         self.run_dir / "samples" / f"{name}.png")
        if self.run_log is not None:  # the trackers show the grids too
            self.run_log.image("samples", path, self.step)
        return path

    def export(self, name: str) -> Path:
        """Deployable weights (collective): the student LoRA in diffusers format, or the full transformer."""
        out = self.run_dir / "exports" / name
        if self.cfg.train.mode == "lora":
            with self.engine.gathered(student_params(self.module).values()):  # whole tensors under ZeRO-3
                state, meta = student_lora(self.module)
            if self.is_main:
                self.backend.save_lora(state, meta, out)
        else:
            state = self.engine.full_state_dict()
            if self.is_main:
                self.backend.save_transformer(self.module, out, state_dict=state)
        barrier()
        if self.is_main:
            log.info("exported %s", out)
        return out

    def save_checkpoint(self) -> Path:
        """A complete, resumable checkpoint (collective); `latest` moves only once every rank is done."""
        path = ckpt.checkpoint_path(self.ckpt_root, self.step)
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            (path / ckpt.MARKER).unlink(missing_ok=True)
            dump_config(self.cfg, path / "config.yaml")
        barrier()
        self.engine.save(path)
        state = {"step": self.step, "data_position": json.dumps(self.position),
                 "world_size": self.info.world_size, "batch_size": self.cfg.train.batch_size,
                 "skipped_steps": self.skipped_steps, "truncated_steps": self.truncated_steps}
        ckpt.save_rank_state(path, self.info.rank, state,
                             self.teacher.state_dict() if self.teacher is not None else None)
        barrier()
        files: dict = {}  # sizes and checksums of everything written, each rank hashing a share
        for share in all_gather_object(ckpt.describe_files(path, self.info.rank, self.info.world_size)):
            files.update(share)
        if self.is_main:
            ckpt.mark_complete(path, self.ckpt_root, {"step": self.step}, self.cfg.checkpoint.keep, files=files)
            log.info("checkpoint %s", path)
        barrier()
        return path

    def resume(self) -> Path | None:
        plan = self._resume_from
        if plan is None:
            return None
        path = plan["path"]
        state, rng, teacher_state = ckpt.load_rank_state(path, self.info.rank)
        try:
            self.engine.load(path)
        except (RuntimeError, ValueError, OSError, KeyError, EOFError) as e:  # damage the file list missed
            raise ckpt.CheckpointError(f"{path}: the engine state does not load ({type(e).__name__}: {e}); "
                                       f"resume from an earlier checkpoint with --resume PATH") from None
        if self.teacher is not None:
            if teacher_state is None:
                raise ckpt.CheckpointError(f"{path} holds no teacher state for rank {self.info.rank}")
            self.teacher.load_state_dict(teacher_state)
        ckpt.restore_rng(rng)
        self._sampled = ()  # new weights: no earlier samples stand for them
        self.step = state["step"]
        self.position = json.loads(state["data_position"])
        self.skipped_steps, self.truncated_steps = state["skipped_steps"], state["truncated_steps"]
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return path

    def fit(self) -> dict:
        """The loop: one training step, its log record, then what is due every N steps."""
        cfg = self.cfg
        run_log, resumed = self._start()
        start_step = self.step
        every_n_steps = [  # (N, action), in this order after a step whose number N divides
            (cfg.checkpoint.every, self.save_checkpoint),
            (cfg.output.save_every, lambda: self.export(f"step_{self.step:06d}")),
            (cfg.validation.every, lambda: self.save_samples(f"step_{self.step:06d}")),
            (cfg.validation.metric_every or cfg.validation.every if cfg.validation.metrics else 0, self.log_metrics),
        ]
        totals = {p: 0.0 for p in PHASES}
        bar = _progress(cfg.train.steps, cfg.output.progress_bar and self.is_main, initial=self.step)
        batches = self.data.batches(self.position)
        stop = StopSignals()
        t_start = time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                record = self._timed_step(batches, totals)
                if run_log and (self.step % cfg.output.log_every == 0 or self.step == cfg.train.steps):
                    run_log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", s_it=f"{record['step_time']:.2f}")
                bar.update(1)
                if self.bad_steps >= MAX_BAD_STEPS:
                    raise FloatingPointError(f"{self.bad_steps} consecutive non-finite steps; stopping "
                                             f"(no bad update was applied). Lower train.lr or check the data.")
                if self.step == cfg.train.steps:
                    break
                self._stop_if_requested(stop)
                for every, action in every_n_steps:
                    if every and self.step % every == 0:
                        action()
        except KeyboardInterrupt:
            # A second Ctrl-C, maybe inside a step: the state may be half-updated, so nothing is saved from it.
            raise Interrupted(self.step, ckpt.find_latest(self.ckpt_root) if self.is_main else None) from None
        finally:
            bar.close()
            stop.restore()
        wall = time.perf_counter() - t_start
        if self.step > start_step or resumed is None:
            self.save_checkpoint()
        return self._finish(run_log, start_step, totals, wall)

    def _start(self) -> tuple[RunLog | None, Path | None]:
        """Base-model samples (before any resume), the resume, the run log and its start record."""
        cfg = self.cfg
        self._base_samples = self.validation_images()
        if cfg.validation.metrics:  # the base model's samples, the metrics' reference, drawn before any resume
            self._metric_base = self.validation_images(*self._metric_prompts())
        resumed = self.resume()
        run_log = None
        if self.is_main:
            run_log = RunLog(self.run_dir, tensorboard=cfg.output.tensorboard,
                             resumed_at=self.step if resumed else None, output=cfg.output, config=cfg.to_dict())
            if run_log.dropped:
                log.info("log.jsonl: dropped %d records of steps after %d, logged before this resume", run_log.dropped,
                         self.step)
        shards = all_gather_object(sum(self.engine.local(p).numel() for p in self.module.parameters()))
        if self.is_main:
            log.info("run %s: %s, %s, %s engine x %d ranks, %d trainable parameters, sigmas %s", self.run_dir,
                     cfg.train.objective, cfg.train.mode, cfg.engine.type, self.info.world_size, self.num_trainable,
                     [round(s, 4) for s in self.sigmas])
            run_log.write({"event": "start", "trainable_params": self.num_trainable, "sigmas": self.sigmas,
                           "params_total": sum(_numel(p) for p in self.module.parameters()),
                           "params_per_rank": shards,
                           "world_size": self.info.world_size, "resumed_from": str(resumed) if resumed else None,
                           "start_step": self.step, "data_samples": self.data.num_samples,
                           "data_skipped": dict(self.data.skipped)})
        self.run_log = run_log
        if cfg.validation.metrics and resumed is None:  # step 0: the base model's own scores
            self.log_metrics(images=self._metric_base)
        return run_log, resumed

    def _timed_step(self, batches, totals: dict[str, float]) -> dict:
        """Next batch, one train_step, and the step's time split (added to `totals`) in its record."""
        t0 = time.perf_counter()
        error = None
        with self.timer("data"):
            try:
                batch, next_position = next(batches)
            except DataError as e:  # raised on the rank whose data failed: every rank must stop with it
                error = e
        if not all_true(error is None):
            raise error or DataError("data: another rank stopped on bad data (its log says why)")
        record = self.train_step(batch)
        self.position = next_position
        phases = self.timer.reset()
        objective = phases.pop("objective")
        # roll-out = the objective's own work around the model calls (noise, Euler updates, losses)
        phases["rollout"] = max(0.0, objective - sum(phases.get(p, 0.0) for p in
                                                       ("encode", "teacher", "student", "forward", "backward")))
        for p in PHASES:
            totals[p] += phases.get(p, 0.0)
        record["step_time"] = time.perf_counter() - t0
        record.update({f"time.{p}": phases.get(p, 0.0) for p in PHASES})
        return record

    def _stop_if_requested(self, stop: StopSignals) -> None:
        """Every rank decides together (a signal can reach the ranks a step apart): checkpoint, then stop."""
        if all_true(stop.requested is None):
            return
        reasons = [r for r in all_gather_object(stop.requested) if r]  # Ctrl-C anywhere wins
        reason = "SIGINT" if "SIGINT" in reasons else reasons[0]
        path = self.save_checkpoint()
        if self.is_main:
            log.warning("stop requested (%s): checkpoint written at step %d, exiting", reason, self.step)
        raise Preempted(self.step, reason, str(path))

    def _finish(self, run_log: RunLog | None, start_step: int, totals: dict[str, float], wall: float) -> dict:
        """Final export and samples, the end record and the summary line."""
        final = self.export("final")
        grid = self.save_samples("final")
        if self.cfg.validation.metrics:
            self.log_metrics()
        steps = max(self.step - start_step, 1)
        split = {p: totals[p] / steps for p in PHASES}
        summary = {"event": "end", "steps": self.step, "steps_this_run": self.step - start_step, "wall_time": wall,
                   "skipped_steps": self.skipped_steps, "truncated_steps": self.truncated_steps,
                   "data_skipped": dict(self.data.skipped), "mean_step_time": wall / steps,
                   **{f"mean_time.{p}": v for p, v in split.items()}, "final": str(final),
                   "samples": str(grid) if grid else None}
        if self.is_main:
            run_log.write(summary)
            run_log.close()
            log.info("done: %d steps in %.1fs; mean per step: %s", self.step - start_step, wall,
                     ", ".join(f"{p} {v * 1000:.1f}ms" for p, v in split.items()))
            if self.data.skipped:
                log.info("skipped %d bad samples: %s", sum(self.data.skipped.values()), dict(self.data.skipped))
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        return summary


def _merged(results: list[StepResult]) -> StepResult:
    """One step's result from its micro-batches' (equal sizes): mean loss, mean of each roll-out term over the
    micro-batches that reached it, and the fewest terms any of them backpropagated (the step still applies
    the gradient of those that did)."""
    if len(results) == 1:
        return results[0]
    n_terms = max(len(r.terms) for r in results)
    terms = [sum(r.terms[k] for r in results if len(r.terms) > k) / sum(len(r.terms) > k for r in results)
             for k in range(n_terms)]
    return StepResult(loss=sum(r.loss for r in results) / len(results), terms=terms,
                      backpropagated=min(r.backpropagated for r in results))


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 parameters are empty outside forwards


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _log_to_file(path: Path) -> logging.Handler:
    """Mirror every log record of this process into the run directory until the run ends."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
