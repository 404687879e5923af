"""The bridge: every trainable parameter of a composition, one cross-attention block per layer pair
(and :func:`bridge_shape_for`, which decides its shape from the two models' configs).

Block k reads specialist layer j_k and writes into the anchor's residual stream after anchor
layer i_k:

    h_i <- h_i + W_o · Attn(Q = norm(h_i) W_q, K = s W_k, V = s W_v),  s = P(norm(s_j))

with P: d_specialist -> d_anchor (the paper's projection; optional) and W_o zero-initialised, so
an untrained composition is exactly the anchor (trap 2).

With ``rotary`` (our default, beyond the paper) queries and keys are rotated by their token
positions (RoPE), so a block can prefer the aligned or a nearby specialist position. Without it
the attention sees only content: the paper's PaLM-size states carry position implicitly, but on
small models the bridge could not find "the same token" (see docs/REPRODUCTION.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.architectures import model_shape
from composer.config import BridgeConfig, ConfigError
from composer.hardware import DTYPES
from composer.pairing import LayerPair, resolve_pairs


@dataclass(frozen=True)
class BridgeShape:
    """Everything needed to rebuild a bridge's tensors (saved in bridge_config.json)."""

    pairs: tuple[LayerPair, ...]
    d_anchor: int
    d_specialist: int
    num_heads: int
    head_dim: int
    project_specialist: bool = True
    norm: bool = True
    causal: bool = True
    rotary: bool = False  # False when absent from a saved config: bridges made before RoPE
    prompt_only: bool = False  # the "specialist as encoder" ablation (BridgeConfig.prompt_only)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pairs"] = [list(p) for p in self.pairs]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BridgeShape:
        data = dict(data)
        data["pairs"] = tuple((int(a), int(s)) for a, s in data["pairs"])
        return cls(**data)

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    def num_parameters(self) -> int:
        """Trainable parameters, computed from the shape alone (no tensors built)."""
        kv_in = self.d_anchor if self.project_specialist else self.d_specialist
        per_block = (
            self.d_anchor * self.inner  # W_q
            + 2 * kv_in * self.inner  # W_k, W_v
            + self.inner * self.d_anchor  # W_o
        )
        if self.project_specialist:
            per_block += self.d_specialist * self.d_anchor
        if self.norm:
            per_block += self.d_anchor + self.d_specialist
        return per_block * len(self.pairs)


def rotate(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0) -> torch.Tensor:
    """RoPE: rotate pairs of channels of (B, H, N, hd) by angles of (B, N) token positions."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, N, hd/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class BridgeBlock(nn.Module):
    """One layer pair's cross-attention: anchor states query projected specialist states."""

    def __init__(self, shape: BridgeShape) -> None:
        super().__init__()
        self.num_heads, self.head_dim = shape.num_heads, shape.head_dim
        self.rotary = shape.rotary
        kv_in = shape.d_anchor if shape.project_specialist else shape.d_specialist
        self.query_norm: nn.Module = nn.RMSNorm(shape.d_anchor) if shape.norm else nn.Identity()
        self.specialist_norm: nn.Module = (
            nn.RMSNorm(shape.d_specialist) if shape.norm else nn.Identity()
        )
        self.specialist_proj: nn.Module = (
            nn.Linear(shape.d_specialist, shape.d_anchor, bias=False)
            if shape.project_specialist
            else nn.Identity()
        )
        self.q_proj = nn.Linear(shape.d_anchor, shape.inner, bias=False)
        self.k_proj = nn.Linear(kv_in, shape.inner, bias=False)
        self.v_proj = nn.Linear(kv_in, shape.inner, bias=False)
        self.o_proj = nn.Linear(shape.inner, shape.d_anchor, bias=False)
        nn.init.zeros_(self.o_proj.weight)  # composed == anchor before training

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def keys_values(
        self, specialist_states: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d_specialist) at (B, S) positions -> keys, values, each (B, H, S, head_dim).

        Cacheable per token: a key depends only on its own token's state and position.
        """
        s = self.specialist_proj(self.specialist_norm(specialist_states))  # (B, S, kv_in)
        keys = self._heads(self.k_proj(s))
        if self.rotary:
            keys = rotate(keys, positions)
        return keys, self._heads(self.v_proj(s))

    def forward(
        self,
        anchor_states: torch.Tensor,  # (B, T, d_anchor)
        keys: torch.Tensor,  # (B, H, S, hd)
        values: torch.Tensor,  # (B, H, S, hd)
        visible: torch.Tensor,  # (B, T, S) bool, True = may read
        positions: torch.Tensor,  # (B, T) token positions of the queries
    ) -> torch.Tensor:
        """The update to add to the anchor's residual stream, (B, T, d_anchor)."""
        q = self._heads(self.q_proj(self.query_norm(anchor_states)))  # (B, H, T, hd)
        if self.rotary:
            q = rotate(q, positions)
        has_any = visible.any(dim=-1)  # (B, T): False only for padding queries
        # SDPA gives NaN for a row with no visible key: let such rows see all, then zero them.
        mask = visible | ~has_any[..., None]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None]
        )  # (B, H, T, hd)
        out = out * has_any[:, None, :, None].to(out.dtype)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, d_anchor)


class Bridge(nn.Module):
    """All blocks of a composition. Its parameters are exactly the trainable parameters.

    The frozen models are never children of this module: ``bridge.state_dict()`` is the whole
    artifact to share, with stable names ``blocks.{k}.{q,k,v,o}_proj.weight`` etc.
    """

    def __init__(self, shape: BridgeShape, *, dtype: str | torch.dtype = torch.float32) -> None:
        super().__init__()
        self.shape = shape
        self.blocks = nn.ModuleList(BridgeBlock(shape) for _ in shape.pairs)
        self.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)

    @property
    def pairs(self) -> tuple[LayerPair, ...]:
        return self.shape.pairs

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bridge_shape_for(
    anchor_config: Any, specialist_config: Any, config: BridgeConfig
) -> BridgeShape:
    """Decide the bridge's shape from both models' configs and the bridge settings (pure)."""
    a, s = model_shape(anchor_config), model_shape(specialist_config)
    pairs = resolve_pairs(config, anchor_layers=a.num_layers, specialist_layers=s.num_layers)
    num_heads = config.num_heads or a.num_heads
    if config.head_dim is not None:
        head_dim = config.head_dim
    elif a.width % num_heads == 0:
        head_dim = a.width // num_heads  # paper: head dim = d_anchor / heads
    else:
        raise ConfigError(
            f"bridge.num_heads={num_heads} does not divide the anchor width {a.width}; "
            "set bridge.head_dim explicitly or choose num_heads dividing the width"
        )
    return BridgeShape(
        pairs=pairs,
        d_anchor=a.width,
        d_specialist=s.width,
        num_heads=num_heads,
        head_dim=head_dim,
        project_specialist=config.project_specialist,
        norm=config.norm,
        causal=config.causal,
        rotary=config.rotary,
        prompt_only=config.prompt_only,
    )
