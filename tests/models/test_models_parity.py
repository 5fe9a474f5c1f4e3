"""Our networks against diffusers/transformers on the same random weights (tiny configs)."""

import pytest
import torch

from sdlite.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdlite.models.config import config_from_dict
from sdlite.models.unet import UNet2DConditionModel, UNetConfig
from sdlite.models.vae import AutoencoderKL, VAEConfig
from sdlite.testing.architectures import TINY_BK_UNET, TINY_TEXT, TINY_UNET, TINY_VAE

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs error relative to the output's max abs value, fp32


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Default init leaves norms at 1/0 and some convs small; perturb everything so all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.2 if p.ndim == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@pytest.mark.parametrize("unet_cfg", [TINY_UNET, TINY_BK_UNET], ids=["sd-shape", "bk-sdm-shape"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_unet_matches_diffusers(unet_cfg, hw):
    ref = diffusers.UNet2DConditionModel(**diffusers_config(unet_cfg)).eval()
    randomize(ref, 0)
    ours = UNet2DConditionModel(config_from_dict(UNetConfig, unet_cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 77, unet_cfg["cross_attention_dim"], generator=g)
    for t in (torch.tensor(999), torch.tensor(1.5), torch.tensor([10.0, 500.0])):
        with torch.no_grad():
            want = ref(x, t, ctx).sample
            got = ours(x, t, ctx)
        assert got.shape == want.shape
        assert rel_err(got, want) < TOL


def test_vae_matches_diffusers():
    ref = diffusers.AutoencoderKL(**diffusers_config(TINY_VAE)).eval()
    randomize(ref, 2)
    ours = AutoencoderKL(config_from_dict(VAEConfig, TINY_VAE)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 6, 5, generator=g)
    img = torch.randn(1, 3, 24, 16, generator=g)
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) < TOL
        dist = ref.encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert rel_err(mean, dist.mean) < TOL
        assert rel_err(logvar, dist.logvar) < TOL


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_text_encoder_matches_transformers(act):
    cfg = dict(TINY_TEXT, hidden_act=act, vocab_size=1000)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    randomize(ref, 4)
    ours = CLIPTextModel(config_from_dict(CLIPTextConfig, cfg)).eval()
    # transformers 5 names keys without the `text_model.` prefix that SD checkpoints carry
    state = {k if k.startswith("text_model.") else "text_model." + k: v
             for k, v in ref.state_dict().items() if "position_ids" not in k}
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        assert rel_err(ours(ids), want) < TOL
        want_skip = ref(ids, output_hidden_states=True).hidden_states[-2]
        want_skip = getattr(ref, "text_model", ref).final_layer_norm(want_skip)
        assert rel_err(ours(ids, clip_skip=1), want_skip) < TOL
