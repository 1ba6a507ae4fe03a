"""Typed run configuration: dataclasses, YAML loading, dotted `--set` overrides, validation.

Every error names the offending key (`train.lr`, `data.resolution`, ...) in one message, because a
misspelt key that is silently ignored costs a cluster job.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass
class ModelConfig:
    backend: str = "zimage"
    # Local directory in the diffusers layout (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).
    path: str = ""
    # Local Qwen3-VL directory whose vision front-end builds the teacher context. Empty: `<path>/teacher_encoder`.
    teacher_encoder_path: str = ""
    # How the teacher sees the target image. zimage: "vlm" (the recipe: Qwen3-VL features of image + prompt, the
    # default) or "reference" (the target as a clean image in the DiT's own omni sequence, as Z-Image-Omni/Edit
    # checkpoints take it; a text-to-image-only checkpoint was never trained for that). flux2_klein: always its
    # editing branch ("reference"). Empty: the backend's default.
    teacher_context: str = ""
    # Build the tiny random checkpoint at `path` when it does not exist (quickstart, tests).
    make_tiny_if_missing: bool = False
    tiny_seed: int = 0
    # Continual tuning: diffusers-format LoRAs (files or folders, e.g. a previous run's exports/final), merged
    # into the DiT's weights in this order before this run's adapters are added. Student and teacher both start
    # from the merged model; this run's LoRA is a delta on top of it (load every LoRA of the chain to use it).
    merge_loras: list[str] = field(default_factory=list)
    dtype: str = "float32"  # storage dtype of frozen weights: float32 | bfloat16
    gradient_checkpointing: bool = False
    # Attention kernels of the DiT and the encoders (dopsd/models/attention.py): auto (CUDA: the fastest installed
    # of flash, xformers, sdpa; elsewhere sdpa) | sdpa | flash | flash_varlen | xformers (flash/xformers: dopsd[gpu]).
    attention: str = "auto"
    attention_backend: str = ""  # removed (validate() points to model.attention); kept so old configs get that message
    # Keep the text encoder (and Z-Image's Qwen3-VL teacher front-end) in CPU memory, on the GPU only while
    # it encodes (dopsd/models/offload.py): for GPUs too small for DiT + encoders (configs/presets/*24gb*).
    offload_encoders: bool = False
    # Regional torch.compile of the DiT's repeated blocks (dopsd/models/compile.py).
    compile: bool = False
    # Triton kernels (dopsd_kernels) in the DiT blocks and the loss: auto | always | never. auto: on CUDA, what the
    # measured table (dopsd_kernels/measured.py) says beats eager and torch.compile on this GPU class; else none.
    # DOPSD_KERNELS=0 in the environment turns them off whatever this says.
    kernels: str = "auto"
    max_text_tokens: int = 512
    teacher_max_tokens: int = 1024
    # Pixel budget of the target image given to the teacher's vision front-end (paper: 512^2 .. 768^2).
    teacher_min_pixels: int = 512 * 512
    teacher_max_pixels: int = 768 * 768


@dataclass
class LoraConfig:
    rank: int = 64
    alpha: float = 128.0
    targets: list[str] = field(default_factory=list)  # empty: the backend's recipe targets
    init: str = "gaussian"  # peft init: B = 0, so the adapter starts as an exact no-op


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full
    objective: str = "dopsd"  # dopsd | sft
    steps: int = 2000
    batch_size: int = 1
    lr: float = 1e-4
    # The learning rate over the run (dopsd/optim.py: diffusers' get_scheduler over train.steps optimizer steps):
    # linear warmup from 0 for warmup_steps, then constant | cosine (to 0) | linear (to 0).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # Micro-batches of train.batch_size per optimizer step (gradients summed, each micro-batch's loss / N, so
    # grad_accum N x batch B computes what batch N*B does; one data position and one checkpoint per optimizer step).
    grad_accum: int = 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 30
    rollout_steps: int = 4  # K
    # Explicit K+1 sigmas (descending, ending at 0); empty: the model's shifted schedule for K steps.
    sigmas: list[float] = field(default_factory=list)
    # The roll-out schedule when train.sigmas is empty (sampling always uses the pipeline's):
    # recipe (the authors' training schedules): zimage K=4 [1, .9, .75, .5] -> 0, K=8 their list [1, .9769, .9478,
    #   .9099, .8586, .7853, .6719, .4732] -> 0, other K: no authors' list, the pipeline's (shift 3 on Turbo);
    #   flux2_klein: set_timesteps(K, mu) without sigmas=, 1024 px K=4 about [1, .952, .832, .0098] -> 0.
    # pipeline (the inference pipeline's): zimage shift-3 warp of linspace(1, 1/K, K), K=8 [1, .9545, .9, ...];
    #   flux2_klein sigmas=linspace(1, 1/K, K) with the same mu, 1024 px K=4 about [1, .967, .908, .767] -> 0.
    schedule: str = "recipe"
    loss_space: str = "x0"  # x0 | v
    ema_decay: float = 0.9999  # teacher = EMA of the student; 1.0 = frozen teacher
    # "per_step": backward after each roll-out step (states are detached, so the gradient equals one
    # backward of the mean, with 1/K of the activation memory). "once": one backward of the mean.
    backward: str = "per_step"
    # D-OPSD's teacher and student predictions at each roll-out state: "fused" (one pass of the DiT for both
    # roles: each layer called once, its weights gathered once under ZeRO-3, no autograd work for the teacher;
    # dopsd/models/dual.py) or "separate" (two forwards, the reference path). Both give the same step.
    dual_forward: str = "fused"
    mixed_precision: str = "no"  # no | bf16
    # SFT baseline: how sigma is drawn for the noised ground-truth latent.
    sft_sigma_sampling: str = "shifted_uniform"  # shifted_uniform | logit_normal | uniform
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DatasetConfig:
    """One entry of data.datasets (dopsd/data/mixture.py). A key left out (None) takes the value of data.<key>."""
    path: str = ""
    type: str | None = None  # folder | manifest | webdataset
    repeats: int = 1  # the dataset appears this many times per epoch
    weight: float = 0.0  # > 0: a sampling share instead of repeats (then every dataset needs one)
    caption: str | None = None
    caption_dropout: float | None = None
    resolution: list[int] | None = None
    buckets: list[list[int]] | None = None
    aspect_buckets: bool | None = None
    crop: str | None = None
    placeholder_replacement: str | None = None
    cached_features: bool | None = None


@dataclass
class DataConfig:
    type: str = "folder"  # folder | manifest (JSONL) | webdataset
    path: str = ""
    resolution: list[int] = field(default_factory=lambda: [1024, 1024])  # [height, width]
    # Replaces the concept placeholder in every caption variant (empty: keep it verbatim, as the recipe does).
    placeholder: str = "[V]"
    placeholder_replacement: str = ""
    num_workers: int = 0
    shuffle: bool = True
    # --- data.type: webdataset (path: brace pattern, '::'-joined list, directory of .tar, or pipe: URL) ---
    sampling: str = "epoch"  # epoch: every shard once per epoch | resampled: shards drawn with replacement
    steps_per_epoch: int = 0  # 0: ceil(samples / (ranks x batch)) from the shard indexes written by make-shards
    buckets: list[list[int]] = field(default_factory=list)  # [[h, w], ...]; empty: derived from data.resolution
    shuffle_buffer: int = 100  # samples held for shuffling per reader worker (they include cached features)
    max_bad_fraction: float = 0.01  # stop the run when more than this fraction of samples read is bad
    cached_features: bool = True  # use encoder features stored in the shards (false: always encode live)
    # --- your own images (dopsd/data/folder.py: folders and manifests; caption_dropout: every type) ---
    # Default caption when a sample has none (e.g. "a photo of [V] dog"); with "{caption}" in it, a template
    # every caption is put into. Precedence: manifest field, NAME.txt, NAME.json, then this.
    caption: str = ""
    caption_dropout: float = 0.0  # probability that a sample's caption is replaced by the empty caption ""
    aspect_buckets: bool = False  # folders/manifests: bucket by aspect ratio as shards do (data.buckets or default)
    crop: str = "center"  # center | random (seeded per seed, epoch, sample)
    # Several datasets mixed (folders, manifests, shards); empty: the one dataset data.type + data.path.
    datasets: list[DatasetConfig] = field(default_factory=list)


@dataclass
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    every: int = 0  # 0: only before and after training
    steps: int = 0  # sampling NFE; 0: train.rollout_steps
    resolution: list[int] = field(default_factory=list)  # empty: data.resolution
    # Editing (flux2_klein): reference image files given with every validation prompt (then an instruction),
    # preprocessed as the pipeline does; empty: text-to-image samples.
    references: list[str] = field(default_factory=list)
    # Few-step quality during training (dopsd/validation.py): metrics of the tuned model's samples of
    # metric_prompts x metric_seeds at `steps` (0: the roll-out's, the model's native budget), scored against the
    # base model's samples of the same prompts and seeds, before the first step, every metric_every steps (0:
    # validation.every) and after the last; into log.jsonl, the trackers and <run>/validation.png.
    # sharpness | base_distance | features=DIR (a local transformers vision model) | package.module:callable
    metrics: list[str] = field(default_factory=list)
    metric_prompts: list[str] = field(default_factory=list)  # old prompts, whose look should survive; empty: prompts
    metric_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    metric_every: int = 0


@dataclass
class EngineConfig:
    type: str = "torch"  # torch (one process) | deepspeed (ZeRO-2/3, launched by deepspeed/torchrun/srun)
    deepspeed_config: str = ""  # DeepSpeed JSON (configs/deepspeed/); empty: built from zero_stage
    zero_stage: int = 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory
    dist_backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    rendezvous_timeout_s: int = 900  # a rank that has not joined by then fails the job with a clear message


@dataclass
class CheckpointConfig:
    every: int = 0  # full resumable checkpoint every N steps (0: only at the end)
    keep: int = 2  # complete checkpoints kept (older ones are deleted once a newer one is complete)
    resume: str = ""  # "" (fresh) | latest (newest complete one, fresh if none) | a checkpoint directory


@dataclass
class OutputConfig:
    dir: str = "runs/dopsd"
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    tensorboard: bool = True
    # Weights & Biases (pip install wandb): scalars and sample grids, one W&B run per output.dir (resumes continue
    # it). Offline or self-hosted: the usual WANDB_MODE / WANDB_BASE_URL environment variables.
    wandb: bool = False
    wandb_project: str = "dopsd"
    wandb_run_name: str = ""  # empty: the name of output.dir
    progress_bar: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with type checks that name the key.

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list,):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, alt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key (valid: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Validation of values (types are already right here).

_CHOICES = {
    "model.backend": ("zimage", "flux2_klein"),
    "model.dtype": ("float32", "bfloat16"),
    "model.kernels": ("auto", "always", "never"),
    "model.attention": ("auto", "sdpa", "flash", "flash_varlen", "xformers"),
    "model.teacher_context": ("", "vlm", "reference"),
    "lora.init": ("gaussian", "zeros"),
    "train.mode": ("lora", "full"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.schedule": ("recipe", "pipeline"),
    "train.loss_space": ("x0", "v"),
    "train.backward": ("per_step", "once"),
    "train.dual_forward": ("fused", "separate"),
    "train.mixed_precision": ("no", "bf16"),
    "train.sft_sigma_sampling": ("shifted_uniform", "logit_normal", "uniform"),
    "train.device": ("auto", "cpu", "cuda"),
    "data.type": ("folder", "manifest", "webdataset"),
    "data.crop": ("center", "random"),
    "data.sampling": ("epoch", "resampled"),
    "engine.type": ("torch", "deepspeed"),
    "engine.zero_stage": (2, 3),
    "engine.dist_backend": ("auto", "nccl", "gloo"),
}


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_dataset(key: str, d: Any) -> None:
    """The data keys that data.datasets[i] may override, on data (key "data") or one entry (None: inherited)."""
    for i, b in enumerate(d.buckets or []):
        if len(b) != 2 or any(r <= 0 or r % 16 for r in b):
            raise ConfigError(f"{key}.buckets[{i}]: need [height, width], positive multiples of 16, got {b}")
    res = d.resolution
    if res is not None and (len(res) != 2 or any(r <= 0 or r % 16 for r in res)):
        raise ConfigError(f"{key}.resolution: need [height, width], positive multiples of 16, got {res}")
    if d.caption_dropout is not None and not 0.0 <= d.caption_dropout <= 1.0:
        raise ConfigError(f"{key}.caption_dropout: must be in [0, 1], got {d.caption_dropout}")
    for name, choices in (("type", _CHOICES["data.type"]), ("crop", _CHOICES["data.crop"])):
        if getattr(d, name) is not None and getattr(d, name) not in choices:
            raise ConfigError(f"{key}.{name}: {getattr(d, name)!r} is not one of {', '.join(choices)}")
    if isinstance(d, DataConfig):
        return
    if not d.path:
        raise ConfigError(f"{key}.path: required (a folder, a .jsonl manifest or shards)")
    if d.repeats <= 0:
        raise ConfigError(f"{key}.repeats: must be > 0, got {d.repeats}")
    if d.weight < 0:
        raise ConfigError(f"{key}.weight: must be >= 0, got {d.weight}")


def validate(cfg: Config) -> Config:
    from .objectives import OBJECTIVES  # the registry: an objective is added in objectives.py alone

    for key, choices in {**_CHOICES, "train.objective": tuple(OBJECTIVES)}.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(choices)}")

    def positive(key: str, allow_zero: bool = False) -> None:
        v = _get(cfg, key)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")

    for key in ("train.steps", "train.batch_size", "train.grad_accum", "train.rollout_steps", "lora.rank", "lora.alpha",
                "train.lr", "train.eps", "model.max_text_tokens", "model.teacher_max_tokens",
                "output.log_every", "model.teacher_min_pixels", "model.teacher_max_pixels",
                "engine.rendezvous_timeout_s"):
        positive(key)
    for key in ("train.warmup_steps", "train.weight_decay", "train.grad_clip", "data.num_workers", "validation.every",
                "validation.steps", "validation.metric_every", "output.save_every", "checkpoint.every", "checkpoint.keep"):
        positive(key, allow_zero=True)
    if not 0.0 <= cfg.train.ema_decay <= 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1], got {cfg.train.ema_decay}")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: need two values in [0, 1), got {cfg.train.betas}")
    if cfg.train.sigmas:
        s = cfg.train.sigmas
        if len(s) != cfg.train.rollout_steps + 1:
            raise ConfigError(f"train.sigmas: need rollout_steps + 1 = {cfg.train.rollout_steps + 1} values, got {len(s)}")
        if not all(a > b for a, b in zip(s, s[1:])) or s[-1] != 0.0 or s[0] > 1.0:
            raise ConfigError(f"train.sigmas: must descend strictly from <= 1 to exactly 0, got {s}")
    for key in ("data.steps_per_epoch", "data.shuffle_buffer"):
        positive(key, allow_zero=True)
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {cfg.data.max_bad_fraction}")
    _check_dataset("data", cfg.data)
    for i, d in enumerate(cfg.data.datasets):
        _check_dataset(f"data.datasets[{i}]", d)
    res = cfg.validation.resolution
    if res and (len(res) != 2 or any(r <= 0 or r % 16 for r in res)):
        raise ConfigError(f"validation.resolution: need [height, width], positive multiples of 16, got {res}")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a local model directory)")
    if not cfg.data.path and not cfg.data.datasets:
        raise ConfigError("data.path: required (or data.datasets, a list of {path, type, repeats, ...})")
    weighted = [d.weight > 0 for d in cfg.data.datasets]
    if any(weighted):
        for i, d in enumerate(cfg.data.datasets):
            if d.weight <= 0:
                raise ConfigError(f"data.datasets[{i}].weight: must be > 0 when another dataset has a weight "
                                  f"(weights are shares of every step; use repeats on all datasets instead)")
            if d.repeats != 1:
                raise ConfigError(f"data.datasets[{i}].repeats: weight and repeats exclude each other (got "
                                  f"weight {d.weight}, repeats {d.repeats})")
    if cfg.model.backend == "flux2_klein" and cfg.model.teacher_context == "vlm":
        raise ConfigError("model.teacher_context: flux2_klein's teacher sees the target through its editing branch "
                          "(reference); it has no VLM route")
    if cfg.model.attention_backend:
        raise ConfigError(f"model.attention_backend: replaced by model.attention (auto | sdpa | flash | flash_varlen "
                          f"| xformers); got {cfg.model.attention_backend!r}")
    if cfg.model.compile and cfg.train.dual_forward == "fused" and cfg.train.objective == "dopsd":
        raise ConfigError("model.compile: the fused dual forward (train.dual_forward: fused, the default) restates "
                          "the DiT blocks' forward and never runs the compiled blocks; set train.dual_forward: "
                          "separate to train with compiled blocks (or model.compile: false)")
    if cfg.model.teacher_min_pixels > cfg.model.teacher_max_pixels:
        raise ConfigError("model.teacher_min_pixels: must not exceed model.teacher_max_pixels")
    if cfg.train.mode == "full" and cfg.model.dtype != "float32":
        raise ConfigError("model.dtype: full fine-tuning keeps float32 master weights; use train.mixed_precision=bf16")
    if cfg.validation.metrics:
        from .validation import parse_metric

        for spec in cfg.validation.metrics:
            parse_metric(spec)
        if not (cfg.validation.metric_prompts or cfg.validation.prompts) or not cfg.validation.metric_seeds:
            raise ConfigError("validation.metrics: set validation.metric_prompts (or validation.prompts) and "
                              "validation.metric_seeds")
        if cfg.validation.references:
            raise ConfigError("validation.metrics: not with validation.references (editing samples) yet")
    if cfg.validation.every and not cfg.validation.prompts:
        raise ConfigError("validation.every: set validation.prompts too")
    if cfg.validation.references:
        if not cfg.validation.prompts:
            raise ConfigError("validation.references: set validation.prompts too (the edit instructions)")
        if cfg.model.backend != "flux2_klein":
            raise ConfigError(f"validation.references: reference images need model.backend flux2_klein, "
                              f"not {cfg.model.backend}")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Loading.

def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); the value is parsed as YAML (lists, bools, numbers)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = dict(data or {})
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return validate(_build(Config, data))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    try:
        return from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
