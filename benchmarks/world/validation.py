"""The miniature world's evaluator as a training-time validation metric (`dopsd.validation`).

    validation:
      metrics: [sharpness, base_distance, "dopsd_world.validation:WorldMetric"]
      metric_prompts: ["a red circle", "a blue square on a white background"]
      metric_seeds: [0, 1, 2, 3]

It reads what each prompt states (`parse_caption`; `[V]` is the held-out checkered texture) and scores the
tuned model's samples as the curved world's benchmark does (`OpenScorer`): accuracy on the stated attributes
only, diversity of the open ones, Fréchet distance and sharpness against real samples of the same prompts.
"""
from __future__ import annotations

import os

from .curved import OpenScorer, PromptSet
from .generator import parse_caption


class WorldMetric:
    """Built with no arguments (the shipped evaluator, or `$DOPSD_WORLD_EVALUATOR`); the scorer for a prompt
    set is built on first use and kept."""

    def __init__(self, evaluator_path: str | None = None):
        from . import EVALUATOR_WEIGHTS
        from .evaluator import load_evaluator

        self.evaluator = load_evaluator(evaluator_path or os.environ.get("DOPSD_WORLD_EVALUATOR") or EVALUATOR_WEIGHTS)
        self._scorers: dict[tuple, OpenScorer] = {}

    def scorer(self, prompts: list[str], per_prompt: int) -> OpenScorer:
        key = (tuple(prompts), per_prompt)
        if key not in self._scorers:
            stated = PromptSet(tuple(parse_caption(p) for p in prompts), tuple(prompts))
            self._scorers[key] = OpenScorer(self.evaluator, stated, per_prompt=per_prompt)
        return self._scorers[key]

    def __call__(self, samples) -> dict[str, float]:
        score = self.scorer(samples.prompts, len(samples.seeds)).score(samples.images)
        keep = ("acc_mean", "diversity_ratio", "fd", "sharpness_ratio", "concept_share")
        return {f"world_{k}": score[k] for k in keep if k in score}
