"""CLIP text encoder (transformers' CLIPTextModel), with its parameter names (`text_model.*`).

Source: the text tower of CLIP, Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision" (arXiv:2103.00020), as implemented by transformers' `CLIPTextModel`
(`transformers/models/clip/modeling_clip.py`): a causal pre-norm transformer over BPE token ids with
learned position embeddings. Stable Diffusion conditions on its last hidden state (SD 1.x uses OpenAI's
ViT-L/14 text tower). No pooled output or projection here: SD does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFolderError
from .config import MAX_CHANNELS, check_field_types, check_range, show

WHERE = "text_encoder config"
MAX_VOCAB_SIZE = 1 << 20  # CLIP's is 49408
MAX_TEXT_LAYERS = 64  # CLIP ViT-bigG's text tower has 32
MAX_POSITIONS = 4096  # CLIP's is 77


@dataclass
class CLIPTextConfig:
    """The fields of transformers' `text_encoder/config.json`, by its names; the defaults are SD 1.5's
    (OpenAI CLIP ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def validate(self) -> None:
        """Raise ModelFolderError for a config this port does not implement, or whose values are of the
        wrong type or out of range (checked once, before anything is built)."""
        check_field_types(self, WHERE)
        if self.hidden_act not in ACTIVATIONS:
            raise ModelFolderError(f"text_encoder config: hidden_act={show(self.hidden_act)} is not supported")
        check_range(WHERE, "vocab_size", self.vocab_size, 1, MAX_VOCAB_SIZE)
        for name in ("hidden_size", "projection_dim"):
            check_range(WHERE, name, getattr(self, name), 1, MAX_CHANNELS)
        check_range(WHERE, "intermediate_size", self.intermediate_size, 1, 4 * MAX_CHANNELS)
        check_range(WHERE, "num_hidden_layers", self.num_hidden_layers, 1, MAX_TEXT_LAYERS)
        check_range(WHERE, "num_attention_heads", self.num_attention_heads, 1, self.hidden_size)
        check_range(WHERE, "max_position_embeddings", self.max_position_embeddings, 2, MAX_POSITIONS)
        check_range(WHERE, "layer_norm_eps", self.layer_norm_eps, 1e-12, 1.0)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            check_range(WHERE, name, getattr(self, name), 0, MAX_VOCAB_SIZE)
        if self.hidden_size % self.num_attention_heads:
            raise ModelFolderError("text_encoder config: hidden_size must divide by num_attention_heads")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: (B, T, dim) -> (B, T, dim); token i sees tokens 0..i."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t):
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)), is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    """fc1, activation, fc2: (B, T, dim) -> (B, T, dim)."""

    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm residual attention, then pre-norm residual MLP: (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Holds the layers (`encoder.layers.<i>` keys); CLIPTextModel.forward runs them."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextEmbeddings(nn.Module):
    """Token plus position embeddings: (B, T) int ids -> (B, T, hidden)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` (B, T, hidden), when given, stands for the token embeddings of `input_ids`."""
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return tokens + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Holds embeddings, encoder and final layer norm (`text_model.*` keys); no forward of its own."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """Token ids (B, 77) -> last hidden state (B, 77, hidden) (after the final layer norm).

    `clip_skip=k` stops k layers early and still applies the final layer norm, as diffusers does.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `input_ids` (B, T) -> (B, T, hidden), without positions: what
        `forward`'s `inputs_embeds` replaces (textual-inversion vectors are put in here)."""
        return self.text_model.embeddings.token_embedding(input_ids)

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 0,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids to the hidden states the UNet cross-attends to.

        Args:
            input_ids: (B, T) int64 token ids (int32 works too), T <= max_position_embeddings (77):
                the tokenizer's output (BOS, prompt, EOS, padding). Ids must be in [0, vocab_size).
                A 1-d (T,) tensor is taken as one sequence.
            clip_skip: how many of the last encoder layers to skip: A1111's "Clip skip" setting
                minus one, i.e. diffusers' `clip_skip`. 0 uses every layer; 1 the penultimate
                layer's output (A1111 "Clip skip 2"). The final layer norm is applied either way.
                Not range-checked here: a value >= num_hidden_layers runs no layer, a negative one
                acts as 0 (the serving layer bounds it).
            inputs_embeds: optional (B, T, hidden) token embeddings used instead of looking up
                `input_ids` (e.g. `token_embeddings(input_ids)` with some rows replaced by
                textual-inversion vectors); position embeddings are added either way, as in
                transformers.

        Returns:
            (B, T, hidden_size) float32 hidden states (the module's compute dtype), e.g.
            (B, 77, 768) for SD 1.x: the UNet's `encoder_hidden_states`.

        Raises:
            ValueError: T > max_position_embeddings.
            IndexError: an id outside [0, vocab_size) (torch's embedding lookup).
            RuntimeError: torch's, for non-integer ids.
        """
        tm = self.text_model
        if input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[-1]} tokens; this text encoder takes at most "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        x = tm.embeddings(input_ids, inputs_embeds)
        layers = tm.encoder.layers
        for layer in layers[: len(layers) - clip_skip]:
            x = layer(x)
        return tm.final_layer_norm(x)
