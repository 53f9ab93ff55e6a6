"""nanoGPT's model.py with triton-moe's MoEMLP in every Block: what changes, and nothing else.

The differences from nanoGPT (github.com/karpathy/nanoGPT, model.py), each marked `# MoE:` below:
1. GPTConfig gains moe_experts ("4x512,4x256": count x width groups), moe_top_k, moe_activation and
   moe_load_balance_coef: plain str/int/float values, so nanoGPT's configurator and a checkpoint's model_args carry
   them as they carry n_layer.
2. Block.mlp is MoEMLP followed by dropout (MoEMLP has none; nanoGPT's MLP drops out after c_proj). MoEMLP has no
   bias, whatever config.bias says.
3. Init: _init_weights re-initialises the router (an nn.Linear) with N(0, 0.02), which is MoEMLP's own init; w2,
   the projection into the residual stream, is scaled by 1/sqrt(2 * n_layer) like c_proj.
4. forward adds the experts' aux loss (load balancing + z-loss) to the loss while training; the eval loss is the
   plain cross-entropy, comparable with a dense model's.
5. configure_optimizers keeps the routers out of weight decay; estimate_mfu counts the active parameters.
6. __init__ prints the active parameters (a token's top-k experts and everything outside the experts) and the total
   after nanoGPT's count.
Left out: nanoGPT's MLP (MoEMLP replaces it) and from_pretrained, which loads GPT-2's weights: their dense MLPs have
no counterpart among the experts.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from triton_moe import MoEConfig, MoEMLP, active_parameters, aux_loss, flops_per_token


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # flash attention make GPU go brrrrr but support is only in PyTorch >= 2.0
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        if not self.flash:
            print("WARNING: using slow attention. Flash Attention requires PyTorch >= 2.0")
            # causal mask to ensure that attention is only applied to the left in the input sequence
            self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                 .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        # MoE: (2) the experts in place of MLP, then MLP's dropout
        self.mlp = MoEMLP(config.moe_config())
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp_dropout(self.mlp(self.ln_2(x)))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # MoE: (1) the experts of every block's MLP, as plain values
    moe_experts: str = "4x1536,4x768"  # count x width groups: experts of different widths in one layer
    moe_top_k: int = 2
    moe_activation: str = "gelu"  # nanoGPT's MLP uses GELU; also "relu_squared", "swiglu"
    moe_load_balance_coef: float = 0.01  # weight of the load-balancing loss in the aux loss

    def moe_config(self) -> MoEConfig:
        return MoEConfig(expert_sizes=self.moe_experts, num_active_experts=self.moe_top_k,
                         hidden_size=self.n_embd, activation=self.moe_activation,
                         load_balance_coef=self.moe_load_balance_coef)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        # MoE: (3) _init_weights covers the routers (nn.Linear); the experts' w1 (and v1) keep MoEMLP's N(0, 0.02)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight") or pn.endswith("mlp.w2"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        print("number of parameters: %.2fM" % (self.get_num_params() / 1e6,))
        # MoE: (6) a token runs through its top-k experts only
        print(f"active parameters: {active_parameters(self) / 1e6:.2f}M of "
              f"{sum(p.numel() for p in self.parameters()) / 1e6:.2f}M (a token's top-{config.moe_top_k} experts)")

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if hasattr(block.attn, "bias"):
                block.attn.bias = block.attn.bias[:, :, :block_size, :block_size]

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only " \
                                            f"{self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if self.training:  # MoE: (4) the experts' aux loss trains the routers; eval reports cross-entropy
                loss = loss + aux_loss(self, detach_layers=True)  # the layers keep theirs without gradient
        else:
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        # MoE: (5) matrices decay, but not the routers: decay pulls their logits toward uniform routing, which the
        # load-balancing loss already asks for, and fights the router's own sharpness
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2 and not n.endswith("mlp.router.weight")]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2 or n.endswith("mlp.router.weight")]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model flops utilization in units of `peak_flops` (nanoGPT's default: an A100's bf16 peak).
        MoE: (5) of the active parameters: each token runs through its top-k experts, not all of them."""
        cfg = self.config
        flops_per_iter = flops_per_token(self, cfg.block_size, cfg.n_layer, cfg.n_embd) * cfg.block_size \
            * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
