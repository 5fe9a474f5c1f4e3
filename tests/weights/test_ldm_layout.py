"""sdlite.weights.ldm_layout: single-file SD 1.x / 2.x checkpoints in the original layout, read by key names
and shapes into diffusers-named mappings and configs.

The files are written by `sdlite.testing.single_file` from random-weight diffusers folders, with its own
statement of the LDM names; diffusers' single-file converters are the independent reference."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import diffusers
import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import load_file

from sdlite.errors import WeightsError
from sdlite.fileio import read_json
from sdlite.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdlite.models.config import config_from_dict
from sdlite.models.unet import UNet2DConditionModel, UNetConfig
from sdlite.models.vae import AutoencoderKL, VAEConfig
from sdlite.samplers.schedule import resolve_config
from sdlite.testing import architectures
from sdlite.testing.random_model import write_random_model
from sdlite.testing.single_file import ldm_state_dict, vae_state_dict, write_single_file
from sdlite.weights import load_into
from sdlite.weights import standard_configs as std
from sdlite.weights.ldm_layout import (
    EMA,
    LAST_LAYER,
    LOSS,
    OTHER_KEYS,
    OTHER_PARTS,
    POSITION_IDS,
    PROJECTION,
    SCHEDULE,
    Source,
    UnsupportedCheckpoint,
    apply,
    read_layout,
    read_vae_layout,
)

PARTS = ("unet", "vae", "text_encoder")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
BUILD = {"unet": (UNetConfig, UNet2DConditionModel), "vae": (VAEConfig, AutoencoderKL),
         "text_encoder": (CLIPTextConfig, CLIPTextModel)}
TINY = ("tiny", "tiny-sd2", "tiny-bk")


def shapes_of(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny architecture as a diffusers folder and as a single file (with EMA copies and the usual extra
    keys), written once."""
    root = tmp_path_factory.mktemp("ldm")
    out = {}
    for seed, arch in enumerate(TINY):
        folder = write_random_model(arch, root / arch, seed=seed + 3)
        file = write_single_file(folder, root / f"{arch}.safetensors", ema=True)
        parts = {p: load_file(str(folder / p / WEIGHT_FILES[p])) for p in PARTS}
        configs = {p: read_json(folder / p / "config.json") for p in PARTS}
        out[arch] = SimpleNamespace(folder=folder, file=file, tensors=load_file(str(file)), parts=parts,
                                    configs=configs, root=root)
    return out


def mapped(layout_part: dict[str, Source], tensors) -> dict[str, torch.Tensor]:
    return {name: apply(src, tensors[src.key]) for name, src in layout_part.items()}


def assert_same_tensors(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))[:10]
    for name, t in reference.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


# ----------------------------------------------------------------------------------------- the tiny files

@pytest.mark.parametrize("arch", TINY)
def test_every_module_tensor_is_the_folders(models, arch):
    m = models[arch]
    layout = read_layout(shapes_of(m.tensors))
    assert layout.family == ("sd2" if arch == "tiny-sd2" else "sd1")
    for part in PARTS:
        assert_same_tensors(mapped(getattr(layout, part), m.tensors), m.parts[part])


def test_fused_qkv_and_vae_attention_are_views(models):
    tensors = models["tiny-sd2"].tensors
    layout = read_layout(shapes_of(tensors))
    fused_key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    fused = tensors[fused_key]
    for i, q in enumerate("qkv"):
        for p in ("weight", "bias"):
            src = layout.text_encoder[f"text_model.encoder.layers.1.self_attn.{q}_proj.{p}"]
            assert src.key == fused_key.replace("weight", p) and src.chunk == (i, 3)
        t = apply(layout.text_encoder[f"text_model.encoder.layers.1.self_attn.{q}_proj.weight"], fused)
        assert t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert t.data_ptr() == fused.data_ptr() + i * t.numel() * t.element_size()
    src = layout.vae["decoder.mid_block.attentions.0.to_q.weight"]
    assert src == Source("first_stage_model.decoder.mid.attn_1.q.weight", shape=(64, 64))
    conv = tensors[src.key]
    assert conv.shape == (64, 64, 1, 1)
    assert apply(src, conv).untyped_storage().data_ptr() == conv.untyped_storage().data_ptr()
    sd1 = read_layout(shapes_of(models["tiny"].tensors))
    assert sd1.text_encoder["text_model.encoder.layers.0.self_attn.q_proj.weight"].chunk is None


@pytest.mark.parametrize("arch", TINY)
def test_inferred_configs_have_the_folders_structure(models, arch):
    m = models[arch]
    layout = read_layout(shapes_of(m.tensors))
    unet, vae, text = m.configs["unet"], m.configs["vae"], m.configs["text_encoder"]
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "mid_block_type", "cross_attention_dim", "use_linear_projection"):
        assert layout.unet_config[key] == unet.get(key, std.SD15_UNET.get(key)), key
    assert layout.unet_config["upcast_attention"] == (arch == "tiny-sd2")
    assert "transformer_layers_per_block" not in layout.unet_config and "time_cond_proj_dim" not in layout.unet_config
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "latent_channels", "scaling_factor"):
        assert layout.vae_config[key] == vae[key], key
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                "hidden_act"):
        assert layout.text_config[key] == text[key], key


@pytest.mark.parametrize("arch", TINY)
def test_sdlite_networks_built_from_the_inferred_configs_load_the_file_zero_copy(models, arch):
    m = models[arch]
    layout = read_layout(shapes_of(m.tensors))
    for part in PARTS:
        cfg_cls, net_cls = BUILD[part]
        with torch.device("meta"):
            net = net_cls(config_from_dict(cfg_cls, getattr(layout, f"{part}_config")))
        report = load_into(net, mapped(getattr(layout, part), m.tensors), source=part)
        assert report.converted == 0 and report.shared == len(net.state_dict()), part


@pytest.mark.parametrize("arch", TINY)
def test_ignored_keys_are_counted_by_reason(models, arch):
    m = models[arch]
    layout = read_layout(shapes_of(m.tensors))
    expected = {EMA: len(m.parts["unet"]) + 2, SCHEDULE: 12}
    if arch == "tiny-sd2":
        expected.update({LAST_LAYER: 12, PROJECTION: 2})
    else:
        expected[POSITION_IDS] = 1
    assert layout.ignored == expected
    total = sum(len(getattr(layout, p)) for p in PARTS)
    fused = 2 * 2 * m.configs["text_encoder"]["num_hidden_layers"] if arch == "tiny-sd2" else 0  # 3 names, 1 key
    assert total - fused + sum(expected.values()) == len(m.tensors)


def test_a_pruned_fp16_ckpt_with_no_extra_keys_and_old_clip_names(models):
    m = models["tiny"]
    dst = write_single_file(m.folder, m.root / "tiny-fp16.ckpt", fmt="ckpt", dtype=torch.float16,
                            extra_keys=False)
    checkpoint = torch.load(dst, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1
    tensors = checkpoint["state_dict"]
    layout = read_layout(shapes_of(tensors))
    assert layout.ignored == {}
    for part in PARTS:
        reference = {k: v.half() for k, v in m.parts[part].items()}
        assert_same_tensors(mapped(getattr(layout, part), tensors), reference)
    # very old SD 1.x files have no "text_model." level under cond_stage_model.transformer
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tensors.items()}
    old_layout = read_layout(shapes_of(old))
    assert set(old_layout.text_encoder) == set(layout.text_encoder)
    assert_same_tensors(mapped(old_layout.text_encoder, old), mapped(layout.text_encoder, tensors))


def test_lcm_guidance_embedding_is_mapped(models):
    shapes = shapes_of(models["tiny"].tensors)
    shapes["model.diffusion_model.time_embed.cond_proj.weight"] = (32, 256)
    layout = read_layout(shapes)
    assert layout.unet_config["time_cond_proj_dim"] == 256
    assert layout.unet["time_embedding.cond_proj.weight"] == Source("model.diffusion_model.time_embed.cond_proj.weight")
    with torch.device("meta"):
        net = UNet2DConditionModel(config_from_dict(UNetConfig, layout.unet_config))
    assert set(net.state_dict()) == set(layout.unet)


# --------------------------------------------------------------------------------- standalone VAE files

def test_standalone_vae_file_with_or_without_prefix(models):
    m = models["tiny"]
    dst = write_single_file(m.folder, m.root / "vae.safetensors", vae_only=True, ema=True)
    tensors = load_file(str(dst))
    assert not any(k.startswith("first_stage_model.") for k in tensors)
    mapping, config, ignored = read_vae_layout(shapes_of(tensors))
    assert_same_tensors(mapped(mapping, tensors), m.parts["vae"])
    assert ignored == {EMA: len(m.parts["vae"]) + 2, LOSS: 2}
    assert config == read_layout(shapes_of(m.tensors)).vae_config
    prefixed = {("" if k.startswith(("model_ema.", "loss.")) else "first_stage_model.") + k: v
                for k, v in tensors.items()}
    mapping2, config2, _ = read_vae_layout(shapes_of(prefixed))
    assert config2 == config and set(mapping2) == set(mapping)
    assert_same_tensors(mapped(mapping2, prefixed), m.parts["vae"])
    with pytest.raises(UnsupportedCheckpoint, match="this is a VAE; pass it as --vae"):
        read_layout(shapes_of(tensors))


def test_a_full_checkpoint_gives_its_vae(models):
    m = models["tiny-sd2"]
    mapping, config, ignored = read_vae_layout(shapes_of(m.tensors))
    assert_same_tensors(mapped(mapping, m.tensors), m.parts["vae"])
    assert ignored[OTHER_PARTS] == sum(k.startswith(("model.diffusion_model.", "cond_stage_model."))
                                       for k in m.tensors)


def test_a_decoder_only_vae():
    """A VAE without its encoder (what text-to-image needs) still maps; the encoder is simply absent."""
    with torch.device("meta"):
        vae = AutoencoderKL(config_from_dict(VAEConfig, architectures.TINY_VAE))
    sd = {k: v for k, v in vae_state_dict(vae.state_dict(), architectures.TINY_VAE).items()
          if not k.startswith(("encoder.", "quant_conv."))}
    mapping, config, _ = read_vae_layout(shapes_of(sd))
    with torch.device("meta"):
        decoder_only = AutoencoderKL(config_from_dict(VAEConfig, config), with_encoder=False)
    assert set(mapping) == set(decoder_only.state_dict())


# ------------------------------------------------------------------------------- full-size SD 1.5 / 2.1

def full_size_shapes(configs: dict[str, dict], family: str) -> tuple[dict[str, tuple[int, ...]], dict[str, set]]:
    """The key/shape set of a full-size checkpoint, from meta modules (no weights), and each network's names."""
    parts = {}
    for part in PARTS:
        cfg_cls, net_cls = BUILD[part]
        with torch.device("meta"):
            parts[part] = net_cls(config_from_dict(cfg_cls, configs[part])).state_dict()
    return shapes_of(ldm_state_dict(parts, configs, family)), {p: set(sd) for p, sd in parts.items()}


@pytest.mark.parametrize("name, family, configs, expected", [
    ("sd15", "sd1", {"unet": std.SD15_UNET, "vae": std.SD15_VAE, "text_encoder": std.SD15_TEXT},
     {"unet": std.SD15_UNET, "vae": std.SD15_VAE, "text_encoder": std.SD15_TEXT}),
    ("sd21", "sd2", {"unet": std.SD21_UNET, "vae": std.SD21_VAE, "text_encoder": std.SD21_TEXT},
     {"unet": {**std.SD21_UNET, "sample_size": 64}, "vae": std.SD15_VAE, "text_encoder": std.SD21_TEXT}),
    ("bk-sdm-tiny", "sd1", {"unet": architectures.BK_SDM_TINY_UNET, "vae": std.SD15_VAE,
                            "text_encoder": std.SD15_TEXT},
     {"unet": architectures.BK_SDM_TINY_UNET, "vae": std.SD15_VAE, "text_encoder": std.SD15_TEXT}),
])
def test_full_size_checkpoints_give_the_standard_configs(name, family, configs, expected):
    shapes, names = full_size_shapes(configs, family)
    layout = read_layout(shapes)
    assert layout.family == family
    assert layout.unet_config == expected["unet"]
    assert layout.vae_config == expected["vae"]
    assert layout.text_config == expected["text_encoder"]
    for part in PARTS:
        assert set(getattr(layout, part)) == names[part], part
    if family == "sd2":
        assert layout.ignored == {LAST_LAYER: 12, PROJECTION: 2}
        assert shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)


# ---------------------------------------------------------------------------- diffusers as the reference

@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])
def test_diffusers_single_file_conversion_agrees(models, arch):
    m = models[arch]
    checkpoint = dict(m.tensors)
    layout = read_layout(shapes_of(checkpoint))
    unet = convert_ldm_unet_checkpoint(checkpoint, m.configs["unet"])
    assert_same_tensors(mapped(layout.unet, checkpoint), unet)
    vae = convert_ldm_vae_checkpoint(checkpoint, m.configs["vae"])
    assert_same_tensors(mapped(layout.vae, checkpoint), vae)
    text_cfg = m.configs["text_encoder"]
    if arch == "tiny-sd2":
        text = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(**text_cfg)), checkpoint)
        # diffusers drops OpenCLIP's last layer by its full-size name (resblocks.23): drop the tiny one here,
        # and the projection, which CLIPTextModel does not have
        last = f"text_model.encoder.layers.{text_cfg['num_hidden_layers']}."
        text = {k: v for k, v in text.items() if not k.startswith(last) and k != "text_projection.weight"}
    else:
        text = convert_ldm_clip_checkpoint(checkpoint)
        assert "text_model.embeddings.position_ids" in text
        del text["text_model.embeddings.position_ids"]
    assert_same_tensors(mapped(layout.text_encoder, checkpoint), text)


# ------------------------------------------------------------------------------------------------- refusals

def _with(**extra):
    return lambda s: {**s, **extra}


def _without(prefix):
    return lambda s: {k: v for k, v in s.items() if not k.startswith(prefix)}


def _in_channels(c, **extra):
    return lambda s: {**s, "model.diffusion_model.input_blocks.0.0.weight": (32, c, 3, 3), **extra}


def _only(shapes):
    return lambda s: dict(shapes)


REFUSALS = [
    ("sdxl", _with(**{"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                      (49408, 768)}), "this is an SDXL checkpoint"),
    ("sdxl-unet", _with(**{"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}), "SDXL"),
    ("upscaler", _in_channels(7, **{"model.diffusion_model.label_emb.weight": (1000, 1024)}), "x4 upscaler"),
    ("unclip", _with(**{"noise_augmentor.betas": (1000,)}), "unCLIP"),
    ("sd3", _only({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536),
                   "model.diffusion_model.x_embedder.proj.weight": (1536, 16, 2, 2)}), "Stable Diffusion 3"),
    ("flux", _only({"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)}),
     "this is a Flux checkpoint"),
    ("flux-prefixed", _only({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}), "Flux"),
    ("pix2pix", _in_channels(8), "instruct-pix2pix"),
    ("depth", _in_channels(5), "depth-to-image"),
    ("depth-midas", _in_channels(5, **{"depth_model.model.scratch.output_conv.0.weight": (128, 256, 3, 3)}),
     "depth-to-image"),
    ("controlnet", _only({"control_model.time_embed.0.weight": (1280, 320),
                          "control_model.input_hint_block.0.weight": (16, 3, 3, 3)}), "ControlNet"),
    ("lora-kohya", _only({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}),
     "this is a LoRA, not a checkpoint"),
    ("lora-te", _only({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4)}), "LoRA"),
    ("lora-peft", _only({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}), "LoRA"),
    ("diffusers-unet", _only({"conv_in.weight": (320, 4, 3, 3),
                              "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}), "diffusers-named"),
    ("diffusers-text", _only({"text_model.embeddings.token_embedding.weight": (49408, 768)}), "diffusers-named"),
    ("junk", _only({"foo.bar": (3,), "optimizer_states.0": (1,)}), "this checkpoint lacks the UNet"),
    ("junk-in-unet", _with(**{"model.diffusion_model.input_blocks.1.0.weird.weight": (3,)}),
     "'model.diffusion_model.input_blocks.1.0.weird.weight'"),
    ("junk-in-text", _with(**{"cond_stage_model.transformer.text_model.pooler.weight": (3,)}),
     "'cond_stage_model.transformer.text_model.pooler.weight'"),
    ("no-text-encoder", _without("cond_stage_model."), "lacks the text encoder (cond_stage_model.*)"),
    ("no-vae", _without("first_stage_model."), "lacks the VAE (first_stage_model.*)"),
    ("unet-only", _without(("first_stage_model.", "cond_stage_model.")), "lacks the VAE (first_stage_model.*) and "
                                                                         "the text encoder"),
    ("no-unet", _without("model.diffusion_model."), "lacks the UNet"),
    ("empty", _only({}), "lacks the UNet"),
]


@pytest.mark.parametrize("name, change, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_other_kinds_of_files_are_refused_in_one_line(models, name, change, message):
    shapes = change(shapes_of(models["tiny"].tensors))
    with pytest.raises(UnsupportedCheckpoint) as info:
        read_layout(shapes)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    if name in ("sdxl", "sd3", "flux", "controlnet"):
        assert "SD 1.x and SD 2.x checkpoints only" in text


def test_the_junk_message_names_the_keys_and_the_layout(models):
    shapes = shapes_of(models["tiny"].tensors)
    with pytest.raises(UnsupportedCheckpoint) as info:
        read_layout({**shapes, **{f"model.diffusion_model.extra.{i}": (1,) for i in range(9)}})
    text = str(info.value)
    assert "9 keys fit" in text and "'model.diffusion_model.extra.0'" in text and "and 4 more" in text and "model.diffusion_model.*" in text


@pytest.mark.parametrize("key, shape, message", [
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (32, 32, 1), "proj_in.weight' has shape [32, 32, 1]"),
    ("model.diffusion_model.time_embed.0.weight", (100, 32), "time_embed.0.weight' has 100 channels"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (32, 48),
     "differ in context widths"),
    ("first_stage_model.decoder.conv_in.weight", (64, 8, 3, 3), "encoder.conv_out.weight' has 8 channels"),
])
def test_shapes_that_fit_no_rule_name_the_key(models, key, shape, message):
    shapes = shapes_of(models["tiny"].tensors)
    assert key in shapes
    with pytest.raises(WeightsError) as info:
        read_layout({**shapes, key: shape})
    assert message in str(info.value)


def test_openclip_fused_projection_must_hold_q_k_v(models):
    shapes = shapes_of(models["tiny-sd2"].tensors)
    shapes["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = (64, 32)
    with pytest.raises(WeightsError, match=r"in_proj_weight has shape \[64, 32\], expected \[96, 32\]"):
        read_layout(shapes)


def test_text_width_must_match_the_unet_context(models):
    shapes = shapes_of(models["tiny-sd2"].tensors)
    for key, shape in list(shapes.items()):
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            shapes[key] = (shape[0], 48)
    with pytest.raises(WeightsError, match="text encoder is 32 wide but the UNet attends to 48-wide context"):
        read_layout(shapes)


def test_apply_never_copies():
    t = torch.arange(12.0).reshape(3, 4)
    assert apply(Source("k"), t) is t
    with pytest.raises(WeightsError, match="without a copy"):
        apply(Source("k", shape=(2, 6)), t.t())
    with pytest.raises(WeightsError, match="does not split into 2 parts"):
        apply(Source("k", chunk=(0, 2)), t)
    assert apply(Source("k", chunk=(2, 3), shape=(2, 2)), t).tolist() == [[8.0, 9.0], [10.0, 11.0]]


# ------------------------------------------------------------------------------------- standard configs

def test_architectures_reexport_the_standard_sd15_configs():
    for name in ("SD15_UNET", "SD15_VAE", "SD15_TEXT", "SD15_SCHEDULER"):
        assert getattr(architectures, name) is getattr(std, name)


@pytest.mark.parametrize("name", ["SD21_SCHEDULER", "SD21_BASE_SCHEDULER", "SD_TURBO_SCHEDULER", "LCM_SCHEDULER"])
def test_standard_schedulers_are_what_diffusers_and_sdlite_take(name):
    config = getattr(std, name)
    cls = getattr(diffusers, config["_class_name"])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(config) - {"_class_name"} <= accepted
    scheduler = cls.from_config(config)
    for key, value in config.items():
        if key != "_class_name":
            assert scheduler.config[key] == value, key
    if config["_class_name"] != "PNDMScheduler":  # sdlite samples PNDM configs with its own samplers
        resolved = resolve_config(config["_class_name"], config)
        assert resolved["prediction_type"] == config["prediction_type"]


def test_sd21_configs_build():
    for part, config in (("unet", std.SD21_UNET), ("vae", std.SD21_VAE), ("text_encoder", std.SD21_TEXT)):
        cfg_cls, _ = BUILD[part]
        config_from_dict(cfg_cls, config).validate()
    assert std.SD_TURBO_SCHEDULER["timestep_spacing"] == "trailing"
    assert std.SD21_SCHEDULER["prediction_type"] == "v_prediction"
    assert std.SD21_BASE_SCHEDULER["prediction_type"] == "epsilon"


def test_stray_keys_outside_the_networks_are_ignored_and_counted(models):
    """A1111 loads with strict=False and diffusers warns: keys outside the three networks (an embedding
    manager, a LoRA's leftover) do not block a checkpoint; they are counted. Inside a network they are
    errors (see the refusals)."""
    shapes = shapes_of(models["tiny"].tensors)
    stray = {"foo.bar": (3,), "embedding_manager.embedder.x": (2,), "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ()}
    layout = read_layout({**shapes, **stray})
    assert layout.ignored[OTHER_KEYS] == 3
    assert layout.unet == read_layout(shapes).unet
