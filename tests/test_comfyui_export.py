"""The ComfyUI LoRA file (`comfyui_lora.safetensors`) applied the way ComfyUI applies it equals the diffusers file
loaded into diffusers, on tiny Z-Image and FLUX.2-klein models with a random (non-zero) LoRA at alpha / rank = 2.

ComfyUI is not installed here; this file re-implements, independently of dopsd.export_comfyui, the parts of its
loader a LoRA goes through (Comfy-Org/ComfyUI):
- comfy/lora.py `model_lora_keys_unet`: the generic `diffusion_model.<comfy name>` keys, then the Lumina2 branch
  (Z-Image) with comfy/utils.py `z_image_to_diffusers`, or the Flux branch (Flux2 subclasses Flux) with
  `flux_to_diffusers`; a target is a comfy weight name, or (name, (dim, offset, size)) for a slice of a fused one;
- comfy/lora.py `load_lora` + comfy/weight_adapter/lora.py `LoRAAdapter.load`: per key x, `x.alpha` and
  `x.lora_up/lora_down.weight` (or `x.lora_B/lora_A.weight`); keys left over are "lora key not loaded";
- `LoRAAdapter.calculate_weight`: weight[slice] += strength * (alpha / lora_down.shape[0], 1.0 without alpha)
  * lora_up @ lora_down;
and compares with the diffusers model after `load_lora_weights` and a peft merge, in ComfyUI's layout (fused
q/k/v, renamed modules), so the per-module weights must match to float32 rounding.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopsd.config import ModelConfig
from dopsd.export_comfyui import FILE_NAME, KEYS, comfyui_alpha, to_comfyui
from dopsd.models import load_backend, make_tiny_model
from dopsd.adapters import STUDENT, add_lora_adapters

RANK, ALPHA = 4, 8  # alpha / rank = 2, as the recipe's 64 / 128
ATOL, RTOL = 1e-6, 1e-5

# Targets beyond the recipe's, to cover more of each family's map (embedders, modulation, single blocks).
EXTRA_TARGETS = {
    "zimage": ["layers.0.adaLN_modulation.0", "layers.1.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0",
               "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1", "all_x_embedder.2-1",
               "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1"],
    "flux2_klein": ["attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
                    "single_transformer_blocks.1.attn.to_out", "x_embedder", "context_embedder", "proj_out"],
}


# --- the diffusers model in ComfyUI's layout (what ComfyUI's model state dict holds, prefix diffusion_model.) ---

def _zimage_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    blocks = sorted({".".join(k.split(".")[:2]) for k in sd if k.startswith(("layers.", "noise_refiner.",
                                                                             "context_refiner."))})
    for b in blocks:
        out[f"{b}.attention.qkv"] = torch.cat([sd[f"{b}.attention.to_{p}.weight"] for p in "qkv"])
        out[f"{b}.attention.out"] = sd[f"{b}.attention.to_out.0.weight"]
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
            if f"{b}.{name}.weight" in sd:
                out[f"{b}.{name}"] = sd[f"{b}.{name}.weight"]
    for comfy, diffusers in (("x_embedder", "all_x_embedder.2-1"), ("final_layer.linear", "all_final_layer.2-1.linear"),
                             ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
                             ("cap_embedder.1", "cap_embedder.1"), ("t_embedder.mlp.0", "t_embedder.mlp.0"),
                             ("t_embedder.mlp.2", "t_embedder.mlp.2")):
        out[comfy] = sd[f"{diffusers}.weight"]
    return {f"diffusion_model.{k}.weight": v for k, v in out.items()}


def _klein_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}):
        b, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        out[f"{c}.img_attn.qkv"] = torch.cat([sd[f"{b}.attn.to_{p}.weight"] for p in "qkv"])
        out[f"{c}.txt_attn.qkv"] = torch.cat([sd[f"{b}.attn.add_{p}_proj.weight"] for p in "qkv"])
        for comfy, diffusers in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                                 ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
                                 ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out")):
            out[f"{c}.{comfy}"] = sd[f"{b}.{diffusers}.weight"]
    for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}):
        b, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{c}.linear1"] = sd[f"{b}.attn.to_qkv_mlp_proj.weight"]
        out[f"{c}.linear2"] = sd[f"{b}.attn.to_out.weight"]
    for comfy, diffusers in (("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")):
        out[comfy] = sd[f"{diffusers}.weight"]
    return {f"diffusion_model.{k}.weight": v for k, v in out.items()}


TO_COMFY = {"zimage": _zimage_to_comfy, "flux2_klein": _klein_to_comfy}


# --- ComfyUI's key map for the two families (model_lora_keys_unet), .weight entries only ---

def _generic_keys(comfy_sd) -> dict:
    keys = {}
    for k in comfy_sd:
        name = k[len("diffusion_model."):-len(".weight")]
        keys[f"lora_unet_{name.replace('.', '_')}"] = k
        keys[f"diffusion_model.{name}"] = k
    return keys


def _zimage_keys(comfy_sd, dim: int) -> dict:
    n_layers = len({k.split(".")[2] for k in comfy_sd if k.startswith("diffusion_model.layers.")})
    z = {}  # z_image_to_diffusers: diffusers weight name -> target
    for frm in [f"layers.{i}" for i in range(n_layers)] + [f"{r}.{i}" for r in ("context_refiner", "noise_refiner")
                                                           for i in range(2)]:  # the map's default refiner depth
        to = f"diffusion_model.{frm}"
        for i, p in enumerate("qkv"):
            z[f"{frm}.attention.to_{p}.weight"] = (f"{to}.attention.qkv.weight", (0, i * dim, dim))
        z[f"{frm}.attention.to_out.0.weight"] = f"{to}.attention.out.weight"
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
            z[f"{frm}.{name}.weight"] = f"{to}.{name}.weight"
    for comfy, diffusers in (("final_layer.linear", "all_final_layer.2-1.linear"),
                             ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
                             ("x_embedder", "all_x_embedder.2-1"), ("cap_embedder.1", "cap_embedder.1"),
                             ("t_embedder.mlp.0", "t_embedder.mlp.0"), ("t_embedder.mlp.2", "t_embedder.mlp.2")):
        z[f"{diffusers}.weight"] = f"diffusion_model.{comfy}.weight"
    keys = _generic_keys(comfy_sd)
    for k, to in z.items():  # the Lumina2 branch
        name = k[:-len(".weight")]
        for key in (f"diffusion_model.{name}", f"transformer.{name}", f"lycoris_{name.replace('.', '_')}", name):
            keys[key] = to
    return keys


def _klein_keys(comfy_sd, hidden: int) -> dict:
    def count(prefix):
        return len({k.split(".")[2] for k in comfy_sd if k.startswith(f"diffusion_model.{prefix}.")})

    f = {}  # flux_to_diffusers
    for i in range(count("double_blocks")):
        frm, to = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        for j, p in enumerate("qkv"):
            f[f"{frm}.attn.to_{p}.weight"] = (f"{to}.img_attn.qkv.weight", (0, j * hidden, hidden))
            f[f"{frm}.attn.add_{p}_proj.weight"] = (f"{to}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for diffusers, comfy in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                                 ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                                 ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                                 ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                                 ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2"),
                                 ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")):
            f[f"{frm}.{diffusers}.weight"] = f"{to}.{comfy}.weight"
    for i in range(count("single_blocks")):
        frm, to = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for j, p in enumerate("qkv"):
            f[f"{frm}.attn.to_{p}.weight"] = (f"{to}.linear1.weight", (0, j * hidden, hidden))
        f[f"{frm}.proj_mlp.weight"] = (f"{to}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        for diffusers, comfy in (("norm.linear", "modulation.lin"), ("proj_out", "linear2"),
                                 ("attn.to_qkv_mlp_proj", "linear1"), ("attn.to_out", "linear2")):
            f[f"{frm}.{diffusers}.weight"] = f"{to}.{comfy}.weight"
    for comfy, diffusers in (("final_layer.linear", "proj_out"), ("img_in", "x_embedder"), ("txt_in", "context_embedder")):
        f[f"{diffusers}.weight"] = f"diffusion_model.{comfy}.weight"
    keys = _generic_keys(comfy_sd)
    for k, to in f.items():  # the Flux branch
        name = k[:-len(".weight")]
        for key in (f"transformer.{name}", f"lycoris_{name.replace('.', '_')}",
                    f"lora_transformer_{name.replace('.', '_')}", name):
            keys[key] = to
    return keys


def comfy_apply(family: str, base_sd, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """ComfyUI's merged weights for `lora` on the diffusers state `base_sd`; (weights, keys not loaded)."""
    comfy_sd = TO_COMFY[family](base_sd)
    if family == "zimage":
        key_map = _zimage_keys(comfy_sd, dim=comfy_sd["diffusion_model.cap_embedder.1.weight"].shape[0])
    else:
        key_map = _klein_keys(comfy_sd, hidden=comfy_sd["diffusion_model.img_in.weight"].shape[0])
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"), (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up in lora:
                key, offset = (target, None) if isinstance(target, str) else target
                patches.setdefault(key, []).append((lora[up], lora[down], alpha, offset))
                loaded |= {up, down}
                break
    weights = {k: v.clone().float() for k, v in comfy_sd.items()}
    for key, ps in patches.items():
        for up, down, alpha, offset in ps:
            w = weights[key] if offset is None else weights[key].narrow(*offset)
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            w += strength * scale * (up.float() @ down.float()).reshape(w.shape)
    return weights, set(lora) - loaded


# --- fixtures: a random LoRA on each tiny model, exported by the backend ---

def _model_dir(family, tmp_path_factory, tiny_model_dir) -> Path:
    if family == "zimage":
        return tiny_model_dir
    out = tmp_path_factory.mktemp("models") / "tiny-klein"
    make_tiny_model("flux2_klein", str(out), seed=0)
    return out


def _backend(family, path):
    return load_backend(ModelConfig(backend=family, path=str(path)), device="cpu")


def _content(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (parsed header, data bytes)."""
    import json
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _merged_state(module) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}


@pytest.fixture(scope="module", params=["zimage", "flux2_klein"])
def exported(request, tmp_path_factory, tiny_model_dir):
    from peft.utils import get_peft_model_state_dict

    family = request.param
    path = _model_dir(family, tmp_path_factory, tiny_model_dir)
    be = _backend(family, path)
    base = {k: v.clone() for k, v in be.transformer.state_dict().items()}
    add_lora_adapters(be.transformer, RANK, ALPHA, be.lora_targets + EXTRA_TARGETS[family], "gaussian",
                      with_teacher=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in be.transformer.named_parameters():
            if f".{STUDENT}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # B non-zero: the delta is not zero
    # what Trainer.export hands the backend
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(be.transformer, adapter_name=STUDENT).items()}
    meta = be.transformer.peft_config[STUDENT].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    out = tmp_path_factory.mktemp(f"export-{family}") / "final"
    diffusers_file = be.save_lora(state, meta, out)
    return dict(family=family, path=path, base=base, state=state, meta=meta, out=out, diffusers_file=diffusers_file)


def test_export_writes_the_comfyui_file_beside_an_unchanged_diffusers_file(exported, tmp_path):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == [FILE_NAME, "pytorch_lora_weights.safetensors"]
    # the diffusers file is what the pipeline's own save_lora_weights writes (same header, same bytes of data;
    # safetensors writes its metadata map in no fixed order, so the raw files may differ in that order only)
    be = _backend(exported["family"], exported["path"])
    be._pipeline().save_lora_weights(tmp_path, transformer_lora_layers=exported["state"], safe_serialization=True,
                                     transformer_lora_adapter_metadata=exported["meta"])
    assert _content(tmp_path / "pytorch_lora_weights.safetensors") == _content(exported["diffusers_file"])

    comfy = load_file(out / FILE_NAME)
    modules = {k.rsplit(".lora_", 1)[0] for k in exported["state"]}
    prefix = KEYS[exported["family"]].prefix
    assert set(comfy) == {f"{prefix}{m}.{s}" for m in modules for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    for m in modules:
        assert torch.equal(comfy[f"{prefix}{m}.lora_up.weight"], exported["state"][f"{m}.lora_B.weight"])
        assert torch.equal(comfy[f"{prefix}{m}.lora_down.weight"], exported["state"][f"{m}.lora_A.weight"])
        assert comfy[f"{prefix}{m}.alpha"].ndim == 0 and comfy[f"{prefix}{m}.alpha"].item() == ALPHA


def test_comfyui_merge_equals_the_diffusers_loaded_model(exported):
    family = exported["family"]
    comfy_file = load_file(exported["out"] / FILE_NAME)
    weights, not_loaded = comfy_apply(family, exported["base"], comfy_file)
    assert not not_loaded, f"ComfyUI would drop {sorted(not_loaded)[:3]}"

    be = _backend(family, exported["path"])
    be.load_lora(be.transformer, exported["out"])  # the folder: diffusers must still pick its own file
    reference = TO_COMFY[family](_merged_state(be.transformer))
    base = TO_COMFY[family](exported["base"])
    assert weights.keys() == reference.keys()
    patched = 0
    for k in reference:
        torch.testing.assert_close(weights[k], reference[k], atol=ATOL, rtol=RTOL, msg=k)
        patched += bool((reference[k] - base[k]).abs().max() > 1e-3)
    # every comfy weight in the layout is a LoRA target here; fused q/k/v got all three slices
    assert patched == len(reference)
    qkv = [k for k in reference if k.endswith("qkv.weight")]
    assert qkv and all(((reference[k] - base[k]).abs().amax(dim=1) > 0).all() for k in qkv)

    # The strength is what the alpha tensors carry: without them ComfyUI applies exactly half the delta (alpha /
    # rank = 2), which is what the diffusers file alone gives in ComfyUI (it maps `transformer.<name>` too).
    no_alpha = {k: v for k, v in comfy_file.items() if not k.endswith(".alpha")}
    for lora in (no_alpha, load_file(exported["diffusers_file"])):
        half, not_loaded = comfy_apply(family, exported["base"], lora)
        assert not not_loaded
        for k in reference:
            torch.testing.assert_close(half[k] - base[k], 0.5 * (reference[k] - base[k]), atol=ATOL, rtol=RTOL)
        assert not all(torch.allclose(half[k], reference[k], atol=1e-3) for k in reference)


def test_comfyui_keys_follow_comfyuis_naming_per_family(exported):
    keys = set(load_file(exported["out"] / FILE_NAME))
    if exported["family"] == "zimage":
        # Z-Image: diffusion_model.<diffusers name>, split q/k/v (ComfyUI slices its fused attention.qkv)
        assert "diffusion_model.layers.0.attention.to_k.lora_down.weight" in keys
        assert "diffusion_model.noise_refiner.0.attention.to_out.0.alpha" in keys
        assert "diffusion_model.all_x_embedder.2-1.lora_up.weight" in keys
    else:
        # klein: transformer.<diffusers name>, including FLUX.2's ff.linear_in / linear_out and single blocks
        assert "transformer.transformer_blocks.0.ff.linear_in.lora_up.weight" in keys
        assert "transformer.transformer_blocks.1.ff_context.linear_out.alpha" in keys
        assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_down.weight" in keys


def test_modules_outside_comfyuis_map_are_refused_and_training_export_keeps_the_diffusers_file(tmp_path, caplog):
    a, b = torch.randn(RANK, 8), torch.randn(8, RANK)
    meta = {"r": RANK, "lora_alpha": ALPHA}
    # klein's modulation layers are not in ComfyUI's flux_to_diffusers map: ComfyUI would drop them silently
    bad = {"double_stream_modulation_img.linear.lora_A.weight": a, "double_stream_modulation_img.linear.lora_B.weight": b}
    with pytest.raises(ValueError, match="does not resolve"):
        to_comfyui(KEYS["flux2_klein"], bad, meta)
    # a q/k/v slice must be one model width high (ComfyUI slices the fused weight in blocks of it)
    wide = {"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": torch.randn(16, RANK)}
    with pytest.raises(ValueError, match="slice"):
        to_comfyui(KEYS["zimage"], wide, meta)
    with pytest.raises(ValueError, match="plain LoRA factor"):
        to_comfyui(KEYS["zimage"], {"layers.0.attention.to_q.lora_magnitude_vector": a}, meta)
    assert comfyui_alpha({"r": 16, "lora_alpha": 8, "use_rslora": True}, 16) == pytest.approx(8 / 4 * 16)

    from dopsd.models.flux2_klein import Flux2KleinBackend

    be = Flux2KleinBackend.__new__(Flux2KleinBackend)  # save_lora needs no model
    with caplog.at_level("WARNING"):
        path = be.save_lora(bad, {**meta, "target_modules": ["double_stream_modulation_img.linear"]}, tmp_path)
    assert path.is_file() and not (tmp_path / FILE_NAME).exists()
    assert "no ComfyUI LoRA file" in caplog.text


def test_cli_export_formats_on_a_trained_checkpoint(make_config, tiny_model_dir, tmp_path, capsys):
    from dopsd import checkpoint as ckpt
    from dopsd.cli import main
    from dopsd.trainer import Trainer

    cfg = make_config("train.steps=1", "train.objective=sft", "validation.every=0", "output.tensorboard=false")
    summary = Trainer(cfg).fit()
    final = Path(summary["final"])
    assert (final / FILE_NAME).is_file()  # the in-run export writes both files
    checkpoint = ckpt.find_latest(Path(cfg.output.dir) / "checkpoints")
    assert checkpoint is not None

    assert main(["export", str(checkpoint), str(tmp_path / "d")]) == 0  # default: the diffusers file only
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert main(["export", str(checkpoint), str(tmp_path / "c"), "--format", "comfyui"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [FILE_NAME]
    assert main(["export", str(checkpoint), str(tmp_path / "b"), "--format", "both"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'b' / 'pytorch_lora_weights.safetensors'}" in printed
    assert f"wrote {tmp_path / 'b' / FILE_NAME}" in printed

    # the offline ComfyUI file is the in-run one, and ComfyUI's merge of it is diffusers' merge of the diffusers file
    offline, in_run = load_file(tmp_path / "c" / FILE_NAME), load_file(final / FILE_NAME)
    assert offline.keys() == in_run.keys()
    for k in offline:
        torch.testing.assert_close(offline[k], in_run[k], atol=1e-7, rtol=0)
    assert (tmp_path / "b" / FILE_NAME).read_bytes() == (tmp_path / "c" / FILE_NAME).read_bytes()
    be = _backend("zimage", tiny_model_dir)
    base = {k: v.clone() for k, v in be.transformer.state_dict().items()}
    weights, not_loaded = comfy_apply("zimage", base, offline)
    assert not not_loaded
    be.load_lora(be.transformer, tmp_path / "d")
    reference = _zimage_to_comfy(_merged_state(be.transformer))
    assert any((reference[k] - _zimage_to_comfy(base)[k]).abs().max() > 0 for k in reference)
    for k in reference:
        torch.testing.assert_close(weights[k], reference[k], atol=ATOL, rtol=RTOL, msg=k)
