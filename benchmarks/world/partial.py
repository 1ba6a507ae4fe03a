"""Mid-stage checkpoints of the toy-base build (`make-toy-base --work DIR`).

A curved-world build takes hours of CPU on a shared box, longer than a working session, and a stage of it
(pretraining above all) longer than the sessions' gaps allow to redo. With `--work`, a long stage saves its
whole loop state every `every_s` seconds: the trained modules, the optimizer and its schedule, every random
stream the loop draws from, the logged loss's running mean and the loop position. A rerun with the same
settings continues from there and ends with the weights an uninterrupted build would have (bit for bit: the
loop draws the same numbers in the same order; tests/test_world_toybase.py). The file goes once the stage's
result is in the stage cache. Tensors go to safetensors, everything else to its JSON metadata (no pickle).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class StageCheckpoint:
    """The loop state of one stage, at `<work>/<name>.partial.safetensors` (no `work`: never saved).

    The loop owns its state and hands it over as `modules` (name -> nn.Module), `opt`, `sched`, `gens`
    (name -> torch.Generator), `rngs` (name -> random.Random) and `tensors` (extra tensors, e.g. results
    collected so far); `restore` fills them in place and returns the saved position and scalars."""

    def __init__(self, work: Path | None = None, name: str = "", every_s: float = 600.0):
        import torch.distributed as dist

        self.path = Path(work) / f"{name}.partial.safetensors" if work is not None else None
        self.every_s = every_s
        self.rank = dist.get_rank() if dist.is_initialized() else 0  # ranks of a data-parallel build agree
        self._last = time.time()

    def resume(self, **loop) -> tuple[int, float | None, float]:
        """A training loop's restore: its (start step, running loss, seconds spent), (0, None, 0.0) if new."""
        saved = self.restore(**loop)
        return (0, None, 0.0) if saved is None else (saved["position"], saved["ema"], saved["seconds"])

    def restore(self, modules: dict, opt=None, sched=None, gens: dict | None = None, rngs: dict | None = None,
                tensors: dict | None = None) -> dict | None:
        """Load a saved state into the given objects; returns its scalars ({"position", ...}) or None."""
        if self.path is None or not self.path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            saved = {k: f.get_tensor(k) for k in f.keys()}
        for name, module in modules.items():
            module.load_state_dict(_prefixed(saved, f"module.{name}."))
        if opt is not None:
            state = {}
            for key, value in _prefixed(saved, "opt.").items():
                index, _, field = key.partition(".")
                state.setdefault(int(index), {})[field] = value
            groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["opt_groups"]]
            opt.load_state_dict({"state": state, "param_groups": groups})
        if sched is not None:
            sched.load_state_dict(meta["sched"])
        for name, gen in (gens or {}).items():
            gen.set_state(saved[f"gen.{name}"])
        for name, rng in (rngs or {}).items():
            rng.setstate(_tuples(meta["rngs"][name]))
        torch.set_rng_state(saved["gen.torch_global"])
        for name, value in _prefixed(saved, "extra.").items():
            (tensors or {})[name] = value
        log.info("%s: resumed at %s", self.path.name, meta["scalars"].get("position"))
        self._last = time.time()
        return meta["scalars"]

    def due(self) -> bool:
        return self.path is not None and time.time() - self._last >= self.every_s

    def save(self, scalars: dict, modules: dict, opt=None, sched=None, gens: dict | None = None,
             rngs: dict | None = None, tensors: dict | None = None) -> None:
        self._last = time.time()
        if self.path is None or self.rank != 0:
            return
        from safetensors.torch import save_file

        out = {f"module.{n}.{k}": v.detach().cpu().contiguous() for n, m in modules.items()
               for k, v in m.state_dict().items()}
        meta: dict = {"scalars": scalars, "rngs": {n: _lists(r.getstate()) for n, r in (rngs or {}).items()}}
        if opt is not None:
            sd = opt.state_dict()
            for index, fields in sd["state"].items():
                for field, value in fields.items():
                    out[f"opt.{index}.{field}"] = torch.as_tensor(value).detach().cpu().contiguous()
            meta["opt_groups"] = _lists(sd["param_groups"])
        if sched is not None:
            meta["sched"] = sched.state_dict()
        for name, gen in (gens or {}).items():
            out[f"gen.{name}"] = gen.get_state()
        out["gen.torch_global"] = torch.get_rng_state()
        for name, value in (tensors or {}).items():
            out[f"extra.{name}"] = value.detach().cpu().contiguous()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(out, str(tmp), metadata={"state": json.dumps(meta)})
        os.replace(tmp, self.path)  # a kill while writing leaves the previous checkpoint
        log.info("%s: saved at %s", self.path.name, scalars.get("position"))

    def finish(self) -> None:
        if self.path is not None and self.rank == 0:
            self.path.unlink(missing_ok=True)


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
