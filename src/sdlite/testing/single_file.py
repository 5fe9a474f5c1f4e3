"""Write a diffusers model folder as one single-file checkpoint in the original (CompVis / Stability) layout.

    write_single_file("tiny-model/", "tiny.safetensors")                     # SD 1.x layout
    write_single_file("tiny-sd2-model/", "tiny-sd2.ckpt", fmt="ckpt")        # SD 2.x: OpenCLIP text encoder
    write_single_file("tiny-model/", "vae.safetensors", vae_only=True)      # a standalone VAE file

The renaming here is written from the LDM key rules directly (the file's names are generated from each
network's config), independently of `sdlite.weights.ldm_layout`, so tests that read these files back check
that reader against a separate statement of the layout. With `family="sd2"` the text encoder is written as
OpenCLIP ViT-H writes it: fused q/k/v (`attn.in_proj_weight` / `in_proj_bias`), one more (random) last
resblock that SD 2.x does not use, `text_projection` and `logit_scale`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ldm_state_dict", "vae_state_dict", "write_single_file"]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
             "posterior_mean_coef1", "posterior_mean_coef2")


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _unet_rows(cfg: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, renames of the module under it) for every UNet module."""
    n = len(cfg["block_out_channels"])
    layers = _per_block(cfg["layers_per_block"], n)
    rows = [("conv_in.", "input_blocks.0.0.", {}), ("time_embedding.linear_1.", "time_embed.0.", {}),
            ("time_embedding.linear_2.", "time_embed.2.", {}),
            ("time_embedding.cond_proj.", "time_embed.cond_proj.", {}),
            ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
            ("mid_block.resnets.0.", "middle_block.0.", _RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
            ("mid_block.resnets.1.", "middle_block.2.", _RESNET)]
    k = 1  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(layers[i]):
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _RESNET))
            rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", {}))
            k += 1
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", {}))
            k += 1
    k = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        count = layers[n - 1 - i] + 1
        for j in range(count):
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _RESNET))
            rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", {}))
            if j == count - 1 and i < n - 1:
                slot = 2 if kind == "CrossAttnUpBlock2D" else 1
                rows.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{slot}.conv.", {}))
            k += 1
    return rows


def _vae_rows(cfg: dict) -> list[tuple[str, str, dict]]:
    n = len(cfg["block_out_channels"])
    rows = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for side in ("encoder", "decoder"):
        rows += [(f"{side}.conv_in.", f"{side}.conv_in.", {}), (f"{side}.conv_out.", f"{side}.conv_out.", {}),
                 (f"{side}.conv_norm_out.", f"{side}.norm_out.", {}),
                 (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
                 (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
                 (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(n):
        up = n - 1 - i  # the file numbers decoder levels from the highest resolution
        rows += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}),
                 (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", {})]
        for j in range(cfg["layers_per_block"] + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
    return rows


def _renamed(name: str, rows: list[tuple[str, str, dict]]) -> str:
    """`name` under the LDM prefix of the longest matching row, its module renamed."""
    best = max((r for r in rows if name.startswith(r[0])), key=lambda r: len(r[0]), default=None)
    if best is None:
        raise KeyError(f"no LDM name for {name!r}")
    return best[1] + _swap(name[len(best[0]):], best[2])


def _swap(rest: str, renames: dict) -> str:
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _vae_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """The VAE's mid attention is stored as 1x1 convolutions: [C, C] linear weights become [C, C, 1, 1]."""
    if ".mid_block.attentions.0.to_" in name and name.endswith("weight") and t.ndim == 2:
        return t.reshape(*t.shape, 1, 1)
    return t


def _openclip(text: dict[str, torch.Tensor], cfg: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict as OpenCLIP's text tower (`cond_stage_model.model.*`), with one more layer."""
    out = {"token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": text["text_model.final_layer_norm.weight"],
           "ln_final.bias": text["text_model.final_layer_norm.bias"]}
    layers = cfg["num_hidden_layers"]
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for ours, theirs in _OPENCLIP_LAYER.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = text[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([text[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
    extra = f"transformer.resblocks.{layers}."
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[extra + key[len("transformer.resblocks.0."):]] = _random_like(out[key], generator)
    hidden = cfg["hidden_size"]
    like = out["ln_final.weight"]
    out["text_projection"] = _random_like(like.new_empty((hidden, cfg.get("projection_dim", hidden))), generator)
    out["logit_scale"] = like.new_full((), math.log(100.0)) if not like.is_meta else like.new_empty(())
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def _random_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if t.is_meta:
        return torch.empty_like(t)
    return (0.02 * torch.randn(t.shape, generator=generator)).to(t.dtype)


def ldm_state_dict(parts: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict], family: str, *,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The original-layout state dict of a model given as diffusers state dicts and configs (keys "unet",
    "vae", "text_encoder"; tensors may be on the meta device: shapes only). `family`: "sd1" (CLIP under
    `cond_stage_model.transformer.`) or "sd2" (OpenCLIP under `cond_stage_model.model.`)."""
    g = torch.Generator().manual_seed(seed)
    rows = _unet_rows(configs["unet"])
    sd = {"model.diffusion_model." + _renamed(k, rows): v for k, v in parts["unet"].items()}
    sd.update({"first_stage_model." + k: v for k, v in vae_state_dict(parts["vae"], configs["vae"]).items()})
    if family == "sd2":
        sd.update(_openclip(parts["text_encoder"], configs["text_encoder"], g))
    else:
        sd.update({"cond_stage_model.transformer." + k: v for k, v in parts["text_encoder"].items()})
    return sd


def vae_state_dict(vae: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict in the original names (no prefix)."""
    rows = _vae_rows(cfg)
    return {_renamed(k, rows): _vae_tensor(k, v) for k, v in vae.items()}


def _schedule_buffers(like: torch.Tensor) -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post = betas * (1 - prev) / (1 - ac)
    values = [betas, ac, prev, ac.sqrt(), (1 - ac).sqrt(), (1 - ac).log(), (1 / ac).sqrt(), (1 / ac - 1).sqrt(),
              post, post.clamp(min=1e-20).log(), betas * prev.sqrt() / (1 - ac),
              (1 - prev) * (1 - betas).sqrt() / (1 - ac)]
    return {k: v.to(like.dtype) for k, v in zip(_SCHEDULE, values)}


def _extras(sd: dict[str, torch.Tensor], family: str, ema: bool, extra_keys: bool, vae_only: bool,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """What real files carry besides the networks: EMA copies, schedule buffers, position_ids, loss weights."""
    out: dict[str, torch.Tensor] = {}
    if ema:
        ema_of = sd if vae_only else {k[len("model."):]: v for k, v in sd.items()
                                     if k.startswith("model.diffusion_model.")}
        for key, t in ema_of.items():
            out["model_ema." + key.replace(".", "")] = t + _random_like(t, generator) + 0.01
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    if extra_keys and vae_only:
        out["loss.logvar"] = torch.zeros(())
        out["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    elif extra_keys:
        out.update(_schedule_buffers(torch.zeros(())))
        if family == "sd1":
            positions = sd["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape[0]
            out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
                torch.arange(positions, dtype=torch.float32)[None] + 0.0001  # a merge's float, off by a bit
    return out


def _read_folder(folder: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors"}
    parts, configs = {}, {}
    for name, file in files.items():
        parts[name] = load_file(str(folder / name / file))
        configs[name] = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
    return parts, configs


def write_single_file(folder: str | Path, dst: str | Path, *, family: str | None = None, fmt: str = "safetensors",
                      dtype: torch.dtype | None = None, ema: bool = False, extra_keys: bool = True,
                      vae_only: bool = False, seed: int = 0) -> Path:
    """Write the diffusers folder `folder` (e.g. from `write_random_model`) as one original-layout file.

    family: "sd1" or "sd2" (the text encoder as OpenCLIP); None: "sd2" when the text encoder's activation is
    GELU (OpenCLIP's), else "sd1". fmt: "safetensors", or "ckpt" (``torch.save({"state_dict": ...,
    "global_step": 1})``). dtype: convert floating tensors (torch.float16: a "pruned fp16" file). ema: add
    `model_ema.*` copies with other values, and `model_ema.decay`. extra_keys: add the noise schedule buffers
    and a float `position_ids` (SD 1.x), or for a VAE file `loss.*` weights. vae_only: a standalone VAE file
    (original names, no prefix)."""
    folder, dst = Path(folder), Path(dst)
    parts, configs = _read_folder(folder)
    if family is None:
        family = "sd2" if configs["text_encoder"].get("hidden_act") == "gelu" else "sd1"
    if family not in ("sd1", "sd2") or fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"family must be sd1 or sd2 and fmt safetensors or ckpt, got {family!r}, {fmt!r}")
    g = torch.Generator().manual_seed(seed)
    if vae_only:
        sd = vae_state_dict(parts["vae"], configs["vae"])
    else:
        sd = ldm_state_dict(parts, configs, family, seed=seed)
    sd.update(_extras(sd, family, ema, extra_keys, vae_only, g))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sd.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ckpt":
        torch.save({"state_dict": sd, "global_step": 1}, dst)
    else:
        save_file(sd, str(dst))
    return dst
