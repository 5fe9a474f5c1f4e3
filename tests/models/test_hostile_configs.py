"""Hostile network configs: every field type- and range-checked once, when the config is read, so a bad
config is one ModelFolderError naming the file before any network is built, and `sdlite info` and
`sdlite generate` refuse the same folders (exit 2, one line, no image) (issue "Hardening", faults 6-8)."""

import json
import math
import shutil
import time

import pytest

from sdlite.cli import main
from sdlite.errors import ModelFolderError
from sdlite.models.clip_text import CLIPTextConfig
from sdlite.models.config import load_config
from sdlite.models.taesd import TAESDConfig
from sdlite.models.unet import UNetConfig
from sdlite.models.vae import VAEConfig
from sdlite.runtime.components import check_folder, text_config, unet_config, vae_config
from sdlite.testing.architectures import (
    BK_SDM_TINY_UNET,
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    TAESD,
    TINY_TAESD,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
)
from sdlite.weights.model_folder import ModelFolder

CLASSES = {"unet": (UNetConfig, TINY_UNET), "vae": (VAEConfig, TINY_VAE), "text": (CLIPTextConfig, TINY_TEXT),
           "taesd": (TAESDConfig, TINY_TAESD)}

# (network, changes, what the message says)
HOSTILE = {
    "unet_channels_float": ("unet", {"block_out_channels": [1e9, 64, 64]}, "block_out_channels must be a list of integers"),
    "unet_channels_huge": ("unet", {"block_out_channels": [32, 64, 10**9]}, "block_out_channels must be from 1 to 8192"),
    "unet_channels_negative": ("unet", {"block_out_channels": [-32, 64, 64]}, "block_out_channels must be from 1"),
    "unet_channels_string": ("unet", {"block_out_channels": "abc"}, "block_out_channels must be a list of integers"),
    "unet_channels_empty": ("unet", {"block_out_channels": [], "down_block_types": [], "up_block_types": []},
                            "down_block_types must have 1 to 8 entries"),
    "unet_channels_bool": ("unet", {"block_out_channels": [True, 64, 64]}, "block_out_channels must be a list"),
    "unet_channels_not_by_groups": ("unet", {"block_out_channels": [36, 64, 64]}, "must divide by norm_num_groups"),
    "unet_channels_not_by_heads": ("unet", {"attention_head_dim": 3, "norm_num_groups": 4,
                                            "block_out_channels": [32, 64, 64]}, "must divide by attention_head_dim"),
    "unet_head_dim_0": ("unet", {"attention_head_dim": 0}, "attention_head_dim must be from 1"),
    "unet_heads_0": ("unet", {"num_attention_heads": 0}, "num_attention_heads must be from 1"),
    "unet_heads_wrong_count": ("unet", {"attention_head_dim": [4, 4]}, "attention_head_dim needs 3 entries"),
    "unet_groups_0": ("unet", {"norm_num_groups": 0}, "norm_num_groups must be from 1"),
    "unet_layers_huge": ("unet", {"layers_per_block": 1_000_000}, "layers_per_block must be from 1 to 16"),
    "unet_layers_0": ("unet", {"layers_per_block": 0}, "layers_per_block must be from 1"),
    "unet_transformer_layers_huge": ("unet", {"transformer_layers_per_block": 10**6}, "transformer_layers_per_block"),
    "unet_norm_eps_nan": ("unet", {"norm_eps": math.nan}, "norm_eps must be a finite number"),
    "unet_norm_eps_inf": ("unet", {"norm_eps": math.inf}, "norm_eps must be a finite number"),
    "unet_norm_eps_0": ("unet", {"norm_eps": 0}, "norm_eps must be from"),
    "unet_norm_eps_negative": ("unet", {"norm_eps": -1e-5}, "norm_eps must be from"),
    "unet_sample_size_float": ("unet", {"sample_size": 8.5}, "sample_size must be an integer"),
    "unet_in_channels_0": ("unet", {"in_channels": 0}, "in_channels must be from 1"),
    "unet_cross_attention_string": ("unet", {"cross_attention_dim": "32"}, "cross_attention_dim must be an integer"),
    "unet_even_kernel": ("unet", {"conv_in_kernel": 4}, "conv_in_kernel must be an odd number"),
    "unet_freq_shift": ("unet", {"freq_shift": 16}, "freq_shift must be from 0 to 15"),
    "unet_block_type_list": ("unet", {"down_block_types": [["x"], "DownBlock2D", "DownBlock2D"]},
                             "down_block_types must be a list of strings"),
    "unet_flag_int": ("unet", {"use_linear_projection": 1}, "use_linear_projection must be true or false"),
    "vae_channels_string": ("vae", {"block_out_channels": "abc"}, "block_out_channels must be a list of integers"),
    "vae_groups_0": ("vae", {"norm_num_groups": 0}, "norm_num_groups must be from 1"),
    "vae_layers_huge": ("vae", {"layers_per_block": 10**6}, "layers_per_block must be from 1 to 16"),
    "vae_latent_0": ("vae", {"latent_channels": 0}, "latent_channels must be from 1"),
    "vae_scaling_0": ("vae", {"scaling_factor": 0}, "scaling_factor must be from 0.0001"),
    "vae_scaling_nan": ("vae", {"scaling_factor": math.nan}, "scaling_factor must be a finite number"),
    "vae_scaling_negative": ("vae", {"scaling_factor": -0.18}, "scaling_factor must be from 0.0001"),
    "vae_shift_inf": ("vae", {"shift_factor": math.inf}, "shift_factor must be a finite number or null"),
    "vae_channels_not_by_groups": ("vae", {"block_out_channels": [32, 60]}, "must divide by norm_num_groups"),
    "text_vocab_negative": ("text", {"vocab_size": -1}, "vocab_size must be from 1"),
    "text_vocab_float": ("text", {"vocab_size": 49408.0}, "vocab_size must be an integer"),
    "text_heads_0": ("text", {"num_attention_heads": 0}, "num_attention_heads must be from 1"),
    "text_heads_not_dividing": ("text", {"num_attention_heads": 5}, "hidden_size must divide by num_attention_heads"),
    "text_layers_huge": ("text", {"num_hidden_layers": 1_000_000}, "num_hidden_layers must be from 1 to 64"),
    "text_positions_0": ("text", {"max_position_embeddings": 0}, "max_position_embeddings must be from 2"),
    "text_eps_nan": ("text", {"layer_norm_eps": math.nan}, "layer_norm_eps must be a finite number"),
    "text_act_list": ("text", {"hidden_act": ["gelu"]}, "hidden_act must be a string"),
    "taesd_channels_string": ("taesd", {"decoder_block_out_channels": "abc"}, "decoder_block_out_channels must be"),
    "taesd_blocks_0": ("taesd", {"num_decoder_blocks": [1, 0]}, "num_decoder_blocks must be from 1"),
    "taesd_blocks_empty": ("taesd", {"num_decoder_blocks": [], "decoder_block_out_channels": []},
                           "decoder_block_out_channels must have 1 to 8 entries"),
    "taesd_scale_huge": ("taesd", {"upsampling_scaling_factor": 10**6}, "upsampling_scaling_factor must be from 1"),
    "taesd_scaling_0": ("taesd", {"scaling_factor": 0}, "scaling_factor must be from 0.0001"),
}


def write(path, data: dict) -> None:
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_is_one_clear_error(tmp_path, case):
    kind, changes, message = HOSTILE[case]
    cls, base = CLASSES[kind]
    path = tmp_path / "config.json"
    write(path, {**base, **changes})
    with pytest.raises(ModelFolderError) as e:
        load_config(cls, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and message in msg, msg


@pytest.mark.parametrize("cls, data", [
    (UNetConfig, SD15_UNET), (UNetConfig, BK_SDM_TINY_UNET), (UNetConfig, TINY_UNET), (VAEConfig, SD15_VAE),
    (VAEConfig, TINY_VAE), (CLIPTextConfig, SD15_TEXT), (TAESDConfig, TAESD), (TAESDConfig, TINY_TAESD),
    (UNetConfig, {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                  "upcast_attention": True, "cross_attention_dim": 1024, "sample_size": 96}),  # SD 2.x
], ids=["sd15-unet", "bk-unet", "tiny-unet", "sd15-vae", "tiny-vae", "sd15-text", "taesd", "tiny-taesd",
        "sd2-unet"])
def test_real_configs_pass(tmp_path, cls, data):
    path = tmp_path / "config.json"
    write(path, data)
    load_config(cls, path)


def test_configs_as_diffusers_and_transformers_save_them_pass(tmp_path):
    """Every field as the libraries write it (nulls, extra keys, their defaults) passes the checks."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    saved = {
        UNetConfig: diffusers.UNet2DConditionModel.from_config(
            {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}).config,
        VAEConfig: diffusers.AutoencoderKL.from_config(
            {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}).config,
        TAESDConfig: diffusers.AutoencoderTiny.from_config(
            {k: v for k, v in TINY_TAESD.items() if not k.startswith("_")}).config,
        CLIPTextConfig: transformers.CLIPTextConfig(**{k: v for k, v in TINY_TEXT.items()
                                                       if k not in ("architectures", "torch_dtype")}).to_dict(),
    }
    for cls, config in saved.items():
        path = tmp_path / f"{cls.__name__}.json"
        path.write_text(json.dumps(dict(config)))
        load_config(cls, path)


def test_huge_layer_counts_are_refused_before_any_work(tmp_path):
    path = tmp_path / "config.json"
    write(path, {**TINY_UNET, "layers_per_block": 1_000_000, "block_out_channels": [8192, 8192, 8192]})
    start = time.perf_counter()
    with pytest.raises(ModelFolderError, match="layers_per_block"):
        load_config(UNetConfig, path)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------ whole folders: info and generate agree


def _edit(rel, **changes):
    def apply(folder):
        path = folder / rel
        data = json.loads(path.read_text())
        data.update(changes)
        write(path, data)
    return apply


FOLDER_CASES = {
    "unet_channels_string": (_edit("unet/config.json", block_out_channels="abc"), "unet/config.json"),
    "unet_heads_0": (_edit("unet/config.json", attention_head_dim=0), "unet/config.json"),
    "unet_norm_eps_nan": (_edit("unet/config.json", norm_eps=math.nan), "unet/config.json"),
    "vae_class_list": (_edit("vae/config.json", _class_name=["AutoencoderKL"]), "vae/config.json"),
    "vae_scaling_0": (_edit("vae/config.json", scaling_factor=0), "vae/config.json"),
    "text_vocab_negative": (_edit("text_encoder/config.json", vocab_size=-1), "text_encoder/config.json"),
    "text_layers_huge": (_edit("text_encoder/config.json", num_hidden_layers=10**6), "text_encoder/config.json"),
    "text_vocab_below_tokenizer": (_edit("text_encoder/config.json", vocab_size=500), "text_encoder/config.json"),
    "scheduler_timesteps_float": (_edit("scheduler/scheduler_config.json", num_train_timesteps=1000.5),
                                  "scheduler/scheduler_config.json"),
    "scheduler_timesteps_huge": (_edit("scheduler/scheduler_config.json", num_train_timesteps=10**9),
                                 "scheduler/scheduler_config.json"),
    "scheduler_flag_string": (_edit("scheduler/scheduler_config.json", clip_sample="no"),
                              "scheduler/scheduler_config.json"),
}


@pytest.fixture
def copy_model(tiny_model, tmp_path):
    def make(name):
        return shutil.copytree(tiny_model, tmp_path / name, ignore=shutil.ignore_patterns("*.png"))
    return make


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_info_and_generate_refuse_the_same_folders(copy_model, tmp_path, capsys, case):
    edit, file = FOLDER_CASES[case]
    folder = copy_model(case)
    edit(folder)
    with pytest.raises(ModelFolderError, match=file.replace(".", r"\.")):
        check_folder(ModelFolder.open(folder))
    out = tmp_path / "out.png"
    for argv in (["info", str(folder)],
                 ["generate", "a cat", "-m", str(folder), "-o", str(out), "--steps", "2", "-W", "32", "-H", "32",
                  "-q"]):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv[0], err)
        assert len(err) == 1 and str(folder / file) in err[0], (argv[0], err)
    assert not out.exists()


def test_component_configs_are_validated_when_read(copy_model):
    folder = copy_model("m")
    _edit("vae/config.json", norm_num_groups=0)(folder)
    f = ModelFolder.open(folder)
    assert unet_config(f).block_out_channels and text_config(f).vocab_size
    with pytest.raises(ModelFolderError, match=r"vae/config\.json: vae config: norm_num_groups"):
        vae_config(f)


def test_untouched_model_passes_the_folder_check(tiny_model):
    check_folder(ModelFolder.open(tiny_model))


def test_tokenizer_longer_than_the_encoder_positions_is_clamped_not_refused(copy_model):
    folder = copy_model("m")
    _edit("tokenizer/tokenizer_config.json", model_max_length=100)(folder)
    check_folder(ModelFolder.open(folder))  # Pipeline clamps the tokenizer to max_position_embeddings
