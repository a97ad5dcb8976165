"""Text encoder: Flan-UL2 encoder (transformers T5) + the ``t5_projections.pt`` heads, and the tokenizer.

The official pipeline trims the context to L = n_tokens + 1 positions after zeroing padded rows. Here the
encoder always returns the static ``tokens_length`` positions (padded rows exactly zero); the trimmed
length travels separately as ``context_len`` (see ``text_context_length``), which the U-Nets use for
their pooling mean. Both forms give the same U-Net outputs (docs/spec/deployment.md, "Context length").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from kvt.contract.stages import context_length

if TYPE_CHECKING:
    from transformers import T5EncoderModel

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"

# Names of the two heads, as keys of t5_projections.pt and as attributes of TextEncoder.
PROJECTION_HEADS = ("projection_base", "projection_interpolation")


def make_projection(d_model: int, context_dim: int) -> nn.Sequential:
    """Linear (no bias) + LayerNorm(eps 1e-5): keys ``0.weight``, ``1.weight``, ``1.bias``."""
    return nn.Sequential(nn.Linear(d_model, context_dim, bias=False), nn.LayerNorm(context_dim))


class TextEncoder(nn.Module):
    """T5 encoder stack + projection heads -> context [B, S, D] with padded positions exactly zero.

    Every pipeline stage uses ``projection_base`` (the released pipeline loads ``projection_interpolation``
    but never uses it); ``head`` selects the other one for experiments.
    """

    def __init__(self, t5: T5EncoderModel, context_dim: int) -> None:
        super().__init__()
        self.t5 = t5
        d_model = t5.config.d_model
        self.projection_base = make_projection(d_model, context_dim)
        self.projection_interpolation = make_projection(d_model, context_dim)

    @property
    def context_dim(self) -> int:
        return cast(nn.LayerNorm, self.projection_base[1]).normalized_shape[0]  # see make_projection

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The T5 stack's last hidden state [B, S, d_model] (runs on all S positions, as official)."""
        out = self.t5(input_ids=input_ids.long(), attention_mask=attention_mask.long())
        return out.last_hidden_state

    def project(self, hidden: torch.Tensor, head: str = "projection_base") -> torch.Tensor:
        """A projection head applied to the hidden states; LayerNorm in fp32 (official precision)."""
        if head not in PROJECTION_HEADS:
            raise ValueError(f"unknown projection head {head!r}; allowed: {list(PROJECTION_HEADS)}")
        linear, norm = getattr(self, head)
        x = linear(hidden.to(linear.weight.dtype))
        y = nn.functional.layer_norm(
            x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        )
        return y

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: str = "projection_base"
    ) -> torch.Tensor:
        """Context [B, S, D] in fp32; rows where ``attention_mask`` is 0 are exactly zero."""
        context = self.project(self.hidden_states(input_ids, attention_mask), head)
        return context.masked_fill((attention_mask == 0).unsqueeze(-1), 0.0)


def text_context_length(attention_mask: torch.Tensor) -> torch.Tensor:
    """L = min(max_b n_tokens_b + 1, S): the official trimmed context length, as float [B].

    The official encoder trims a batch to max(mask.sum) + 1 positions; every row (prompt and null
    rows alike) then has that length, so the pooling mean of every row divides by it.
    """
    seq = attention_mask.shape[-1]
    n_tokens = (attention_mask != 0).sum(-1).amax()
    length = context_length(n_tokens, seq).to(torch.float32)
    return length.expand(attention_mask.shape[0]).clone()


def trim_context(
    context: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official trimmed form (context [B, L, D], mask [B, L]) of a static-length context."""
    length = int(text_context_length(attention_mask)[0].item())
    return context[:, :length], attention_mask[:, :length]


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids padded to the static length; ``truncated`` says the prompt lost tokens."""

    input_ids: torch.Tensor  # int64 [1, S]
    attention_mask: torch.Tensor  # int64 [1, S]
    n_tokens: int  # pieces + EOS kept (>= 1)
    n_tokens_requested: int  # pieces + EOS before truncation
    tokens_length: int

    @property
    def truncated(self) -> bool:
        return self.n_tokens_requested > self.n_tokens


class PromptTokenizer:
    """T5 SentencePiece tokenizer with the official call: ``max_length=S, truncation=True``, EOS kept,
    then right-padded with pad id 0 to exactly S."""

    def __init__(self, folder: str | Path, tokens_length: int) -> None:
        from transformers import T5Tokenizer

        folder = Path(folder)
        if not (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no tokenizer (expected spiece.model or tokenizer.json of a T5 tokenizer)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._tokenizer = T5Tokenizer.from_pretrained(str(folder))
        self.folder = folder
        self.tokens_length = tokens_length
        self.pad_id = int(self._tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def count_tokens(self, prompt: str) -> int:
        """Pieces + EOS of the untruncated prompt."""
        return len(self._tokenizer(prompt)["input_ids"])

    def __call__(self, prompt: str) -> TokenizedPrompt:
        encoded = self._tokenizer(prompt, max_length=self.tokens_length, truncation=True)
        ids = list(encoded["input_ids"])
        pad = self.tokens_length - len(ids)
        input_ids = torch.tensor([ids + [self.pad_id] * pad], dtype=torch.int64)
        attention_mask = torch.tensor([[1] * len(ids) + [0] * pad], dtype=torch.int64)
        return TokenizedPrompt(
            input_ids=input_ids,
            attention_mask=attention_mask,
            n_tokens=len(ids),
            n_tokens_requested=self.count_tokens(prompt),
            tokens_length=self.tokens_length,
        )

    def save(self, folder: str | Path) -> None:
        self._tokenizer.save_pretrained(str(folder))
