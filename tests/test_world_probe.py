"""dopsd-world probe: a short pretraining, then per caption kind the accuracy of each attribute it states."""
import json

import torch

from conftest import REPO  # noqa: F401  (puts the repo on the path)


def test_probe_scores_each_caption_kind_on_its_stated_attributes(tmp_path):
    from dopsd_world import EVALUATOR_WEIGHTS
    from dopsd_world.cli import main

    threads = torch.get_num_threads()
    out = tmp_path / "probe.json"
    try:
        assert main(["probe", "--evaluator", str(EVALUATOR_WEIGHTS), "--steps", "2", "--world", "curved",
                     "--count", "6", "--sample-steps", "2",
                     "--ceiling-prompts", "2", "--ceiling-seeds", "2", "--ceiling-more", "3", "--out", str(out), "--work", str(tmp_path / "work"),
                     "--set", "num_images=32", "--set", "num_unnamed=8", "--set", "vae_steps=2",
                     "--set", "vae_batch=8", "--set", "batch=4", "--set", "dit_dim=32", "--set", "dit_layers=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r["world"] == "curved" and r["steps"] == 2
    assert set(r["all"]) == {"shape", "color", "size", "position", "background", "texture", "mean"}
    assert set(r["shape_color"]) == {"shape", "color", "mean"}
    assert set(r["shape_color_position"]) == {"shape", "color", "position", "mean"}
    # the world's own captions state shape and colour always, the rest only sometimes
    assert {"shape", "color", "mean"} <= set(r["world_captions"]) <= set(r["all"])
    assert all(0.0 <= v <= 1.0 for kind in ("all", "world_captions") for v in r[kind].values())
    # the curvature reading: 4 steps against --sample-steps, as the gate's ceiling computes it
    c = r["ceiling"]
    assert c["samples"] == "2 prompts x 2 seeds" and set(c["4_steps"]) == set(c["2_steps"])
    assert abs(c["base_fd_over_many"] - c["4_steps"]["fd"] / c["2_steps"]["fd"]) < 1e-3
    assert isinstance(c["reachable"], bool)
    assert abs(c["vs_3_steps"]["base_fd_over_many"] - c["4_steps"]["fd"] / c["3_steps"]["fd"]) < 1e-3
    assert 0.0 < r["vae_sharpness_ratio"] < float("inf")
    # the VAE stage was cached in --work (a later probe or build with the same settings reuses it)
    assert list((tmp_path / "work").glob("vae-*.safetensors"))


def test_probe_with_no_steps_reads_only_the_vae(tmp_path):
    from dopsd_world import EVALUATOR_WEIGHTS
    from dopsd_world.cli import main

    threads = torch.get_num_threads()
    out = tmp_path / "vae.json"
    try:
        assert main(["probe", "--evaluator", str(EVALUATOR_WEIGHTS), "--steps", "0", "--out", str(out),
                     "--set", "num_images=16", "--set", "num_unnamed=4", "--set", "vae_steps=2",
                     "--set", "vae_batch=4", "--set", "dit_dim=32", "--set", "dit_layers=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r["steps"] == 0 and "ceiling" not in r and "all" not in r
    # a 2-step VAE reconstructs noise, not the images: its sharpness is nowhere near theirs
    assert r["vae_sharpness_ratio"] > 0.0 and abs(r["vae_sharpness_ratio"] - 1.0) > 0.05
