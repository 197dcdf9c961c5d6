"""A decoder-only transformer language model, cut into embedding, blocks and head.

The model is small and plain so that its pipeline behaviour is easy to read:
token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks
(causal self-attention through ``scaled_dot_product_attention``, then a GELU
MLP, each with a residual connection), a final LayerNorm and a linear head to
``vocab_size`` logits. :meth:`GPT.pipeline_layers` hands the splitter the
embedding, each block and the head as separate layers, so a split can put
them on different stages.

``tie_embeddings=True`` makes the head's weight the token embedding's
Parameter. Unsplit, that is ordinary weight tying; split across stages, each
stage keeps its own copy and the pipeline sums their gradients before every
update (docs/design.md section 11).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from timeprest.errors import ConfigError


class Embedding(nn.Module):
    """Token ids ``B x T`` to vectors ``B x T x n_embd`` (token + position)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        if t > self.block_size:
            raise ValueError(
                f"a sequence of {t} tokens is longer than block_size {self.block_size}"
            )
        positions = torch.arange(t, device=idx.device)
        out: Tensor = self.drop(self.tok(idx) + self.pos(positions))
        return out


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position i sees positions 0..i only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # B x T x C -> B x heads x T x C/heads
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        out: Tensor = self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class Head(nn.Module):
    """Final LayerNorm and the linear map to logits ``B x T x vocab_size``."""

    def __init__(self, n_embd: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.out = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.ln(x))
        return out


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx)`` returns next-token logits per position."""

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model gpt: {name} must be an integer >= 1, got {value!r}")
        if n_embd % n_head:
            raise ConfigError(f"model gpt: n_embd {n_embd} is not divisible by n_head {n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model gpt: dropout must be in [0, 1), got {dropout}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.tie_embeddings = tie_embeddings
        self.embed = Embedding(vocab_size, block_size, n_embd, dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.head = Head(n_embd, vocab_size)
        self.apply(_init)
        # residual projections scaled down with depth, so the residual stream's
        # variance does not grow with the number of blocks
        for block in self.blocks:
            assert isinstance(block, Block)
            for proj in (block.attn.proj, block.mlp[2]):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layer))
        if tie_embeddings:
            self.head.out.weight = self.embed.tok.weight

    def pipeline_layers(self) -> list[nn.Module]:
        """The units a split groups into stages: embedding, each block, head."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.head(x)
        return out


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


gpt = GPT
"""``timeprest.models.gpt(vocab_size=256, block_size=128, ...)``: a freshly initialised GPT."""


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over every position (nats per token).

    A mean over all ``B x T`` tokens, so a micro-batch of ``n_j`` rows weighs
    ``n_j / n`` of the mini-batch loss as docs/design.md section 7 wants. The
    logits are taken in float32, so a bf16 forward still averages exactly.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


GPT_OPTIONS: dict[str, type] = {
    "vocab_size": int,
    "block_size": int,
    "n_layer": int,
    "n_head": int,
    "n_embd": int,
    "dropout": float,
    "tie_embeddings": bool,
}


def parse_model_options(text: str | None) -> dict[str, int | float | bool]:
    """``KEY=VALUE,KEY=VALUE`` (``--model-opt``, repeated flags joined by commas) to typed values."""
    out: dict[str, int | float | bool] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GPT_OPTIONS:
            raise ConfigError(
                f"--model-opt {item!r}: expected KEY=VALUE with KEY one of {', '.join(GPT_OPTIONS)}"
            )
        kind, value = GPT_OPTIONS[key], value.strip()
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1", "yes")
            else:
                out[key] = kind(value)
        except ValueError:
            raise ConfigError(
                f"--model-opt {key}: expected {kind.__name__}, got {value!r}"
            ) from None
    return out
