"""A small nanoGPT-style GPT whose Block MLP is a Mixture of Experts (`reference.MoEMLP`, `triton_moe.MoEMLP`, the
baselines) or, for comparison, a dense MLP (`dense_mlp(width)`).

Pre-LN blocks (ln -> causal self-attention, ln -> MoE MLP), learned position embeddings, tied input and output
embeddings, nanoGPT's init. The loss is the next-token cross-entropy plus `triton_moe.aux_loss(model)`.
Both MLP classes have the same parameter names and layout, so one model's `state_dict` loads into the other.
`load_bytes` and `get_batch` read the byte-level corpus it trains on (validate_training.py, examples/train_ep.py).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from triton_moe import MoEConfig, MoELayer, aux_loss
from triton_moe.activations import apply_activation


@dataclass
class GPTConfig:
    moe: MoEConfig  # the MLP of every block; moe.hidden_size must be n_embd
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256  # context length
    vocab_size: int = 256  # bytes

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.moe.hidden_size != self.n_embd:
            raise ValueError(f"moe.hidden_size={self.moe.hidden_size} must equal n_embd={self.n_embd}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class DenseMLP(nn.Module):
    """nanoGPT's MLP without bias, with the MoE config's activation: act(x w1ᵀ [, x v1ᵀ]) w2, w1, v1, w2 [width, H]
    (the names and layout of one expert, so GPT's init treats them alike)."""

    def __init__(self, config: MoEConfig, width: int):
        super().__init__()
        self.config = config
        self.w1 = nn.Parameter(torch.empty(width, config.hidden_size))
        self.v1 = nn.Parameter(torch.empty(width, config.hidden_size)) if config.is_gated else None
        self.w2 = nn.Parameter(torch.empty(width, config.hidden_size))
        for param in self.parameters():
            nn.init.normal_(param, mean=0.0, std=config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_up = x @ self.v1.to(x.dtype).T if self.v1 is not None else None
        h_act = apply_activation(self.config.activation, x @ self.w1.to(x.dtype).T, h_up)  # (..., width)
        return h_act @ self.w2.to(x.dtype)  # (..., H)


def dense_mlp(width: int):
    """The MLP class argument of GPT for a dense MLP of `width`: e.g. top-k times the mean expert width, the
    active width of an MoE layer."""
    return lambda config: DenseMLP(config, width)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, mlp_cls):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = mlp_cls(config.moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, mlp_cls):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, mlp_cls) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings

        # nanoGPT's init: N(0, 0.02) for linear and embedding weights, MoE layers their own N(0, init_std), and
        # the projections that write into the residual stream scaled down by sqrt(2 * n_layer).
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, MoELayer):
                module.reset_parameters()
        for name, param in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.w2"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) int64 byte ids. Returns logits (B, T, vocab) and, with targets, the scalar loss
        cross-entropy + aux_loss(self) (else None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        # detach_layers: the sum is the aux losses' one way into the loss, which spares a compiled backward a zero
        # gradient per layer (triton_moe.aux_loss)
        return logits, loss + aux_loss(self, detach_layers=True)


# ---------------------------------------------------------------- the byte-level corpus it trains on


def load_bytes(path: Path) -> torch.Tensor:
    """The file as a 1-D int64 tensor of byte values (vocabulary 256)."""
    return torch.from_numpy(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64))


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows of the corpus: inputs and next-byte targets, (B, T) int64 each, on the CPU."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size + 1)  # (T + 1,)
    windows = data[starts[:, None] + offsets]  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]
