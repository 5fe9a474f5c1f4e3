"""The networks' input checks: a clear ValueError for the two obvious misuses (too many tokens for the
text encoder; a sample whose channel count is not the config's), instead of torch's shape errors."""

import pytest
import torch

from sdlite.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdlite.models.taesd import AutoencoderTiny, TAESDConfig
from sdlite.models.unet import UNet2DConditionModel, UNetConfig
from sdlite.models.vae import AutoencoderKL, VAEConfig

# tiny versions of the SD 1.x shapes (as the tiny test models); random weights, default init
TINY_UNET = UNetConfig(
    sample_size=8, block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = VAEConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
TINY_TAESD = TAESDConfig(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                         num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 2))
TINY_TEXT = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=32)


@pytest.fixture(scope="module")
def unet():
    return UNet2DConditionModel(TINY_UNET).eval()


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL(TINY_VAE).eval()


@pytest.fixture(scope="module")
def taesd():
    return AutoencoderTiny(TINY_TAESD, with_encoder=True).eval()


@pytest.fixture(scope="module")
def text_encoder():
    return CLIPTextModel(TINY_TEXT).eval()


def test_text_encoder_refuses_more_tokens_than_positions(text_encoder):
    with torch.no_grad():
        assert text_encoder(torch.randint(0, 1000, (2, 77))).shape == (2, 77, 32)
        assert text_encoder(torch.randint(0, 1000, (1, 5))).shape == (1, 5, 32)
        with pytest.raises(ValueError, match=r"78 tokens.*max_position_embeddings=77"):
            text_encoder(torch.randint(0, 1000, (2, 78)))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 5, 8, 8), (4, 8, 8)], ids=["3ch", "5ch", "3d"])
def test_unet_refuses_a_sample_of_the_wrong_shape(unet, shape):
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        assert unet(torch.randn(2, 4, 8, 8), 10, ctx).shape == (2, 4, 8, 8)
        with pytest.raises(ValueError, match=r"UNet sample must be a \(B, 4, H, W\) tensor, got shape"):
            unet(torch.randn(shape), 10, ctx)


def test_vae_refuses_wrong_channel_counts(vae):
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 4, 5, 6)).shape == (1, 3, 10, 12)
        assert vae.encode(torch.randn(1, 3, 8, 6))[0].shape == (1, 4, 4, 3)
        with pytest.raises(ValueError, match=r"decode input must be a \(B, 4, H, W\) tensor"):
            vae.decode(torch.randn(1, 3, 5, 6))
        with pytest.raises(ValueError, match=r"encode input must be a \(B, 3, H, W\) tensor"):
            vae.encode(torch.randn(1, 4, 8, 8))  # latents passed where an image belongs


def test_vae_without_encoder_still_says_so_first():
    decoder_only = AutoencoderKL(TINY_VAE, with_encoder=False)
    with pytest.raises(RuntimeError, match="without its encoder"):
        decoder_only.encode(torch.randn(1, 4, 8, 8))


def test_taesd_refuses_wrong_channel_counts(taesd):
    with torch.no_grad():
        assert taesd.decode(torch.randn(1, 4, 5, 6)).shape == (1, 3, 10, 12)
        assert taesd.encode(torch.randn(1, 3, 8, 6)).shape == (1, 4, 4, 3)
        with pytest.raises(ValueError, match=r"decode input must be a \(B, 4, H, W\) tensor"):
            taesd.decode(torch.randn(1, 3, 5, 6))
        with pytest.raises(ValueError, match=r"encode input must be a \(B, 3, H, W\) tensor"):
            taesd.encode(torch.randn(1, 4, 8, 8))
