"""DeBERTaV3 backbone: word embeddings and an encoder with disentangled attention.

He, Gao, Chen, "DeBERTaV3: Improving DeBERTa using ELECTRA-Style Pre-Training with
Gradient-Disentangled Embedding Sharing", arXiv 2111.09543. The attention is DeBERTa's
(He, Liu, Gao, Chen, arXiv 2006.03654, eq. 2-4) with the V2/V3 changes: log-bucketed
relative positions, keys/queries of positions projected by the content projections
(`share_att_key`), and LayerNorm'd relative embeddings.

Semantics and parameter names are those of Hugging Face `DebertaV2Model`, so the
state dicts are interchangeable key for key. One deliberate difference: HF masks attention
for padded *queries* as well as keys; here only keys are masked. Outputs at non-pad
positions are identical; outputs at pad positions differ and are never used.

ZeRO-3 rule followed throughout: a parameter is read only inside the `forward` of the module
that owns it (DeepSpeed gathers a module's parameters only while its forward runs), hence
the relative table is looked up by row ids and the tied MLM output layer is
`WordEmbedding.forward(x, output_layer=...)`. Only the rows of the relative table that the
sequence length can reach are projected (`relative_window`).

Shape legend: B batch, L sequence length, H hidden size, heads attention heads,
d head dim (H / heads), k position buckets (the relative table has 2k rows), S rows of it
reachable at length L (2L - 1 up to L = k/2 + 1, at most 2k), V vocabulary.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import DebertaV3Config
from model.dropout import Dropout, dropout_matmul
from model.precision import autocast_input

logger = logging.getLogger(__name__)


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for Linear/Embedding weights, zero biases, zero padding row (as HF)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def log_bucket_position(rel: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Map relative distances to buckets: exact for |rel| <= k/2, log-spaced beyond, up to
    `max_position` (DeBERTaV2 "position buckets"). Odd in `rel`: bucket(-r) = -bucket(r)."""
    mid = bucket_size // 2
    abs_rel = rel.abs().clamp(min=mid - 1)  # values below mid are not used by the log branch
    # log base = float32 log of the ratio, computed as the reference does so boundaries agree
    log_base = torch.log(torch.tensor((max_position - 1) / mid))
    log_pos = torch.ceil(torch.log(abs_rel / mid) / log_base * (mid - 1)) + mid
    return torch.where(rel.abs() <= mid, rel, log_pos.long() * rel.sign())


def relative_window(seq_len: int, cfg: DebertaV3Config) -> tuple[int, int]:
    """Rows [lo, hi) of the 2k relative table that a length-L sequence can reach; the rest
    would only produce c2p/p2c columns that are never gathered."""
    k = cfg.position_buckets
    far = int(log_bucket_position(torch.tensor(seq_len - 1), k, cfg.max_relative))
    return max(k - far, 0), min(k + far, 2 * k - 1) + 1


def relative_table_index(seq_len: int, cfg: DebertaV3Config, device: torch.device) -> torch.Tensor:
    """Row of the relative window (see `relative_window`) for every distance r = i - j, listed
    for r = L-1, L-2, ..., -(L-1): (2L - 1,). Expanding the projected window with it (a
    gather on the smallest tensor) gives a Toeplitz table that `relative_shift` turns into the
    (L, L) scores without any gather on a (B, heads, L, L) tensor."""
    rel = torch.arange(seq_len - 1, -seq_len, -1, device=device)
    k = cfg.position_buckets
    lo, _ = relative_window(seq_len, cfg)
    bucket = log_bucket_position(rel, k, cfg.max_relative)
    return (bucket + k).clamp(0, 2 * k - 1) - lo  # (2L - 1,)


def relative_shift(x: torch.Tensor) -> torch.Tensor:
    """(..., L, 2L - 1) with column c holding distance i - j = L - 1 - c -> (..., L, L) with
    out[i, j] = x[i, j - i + L - 1]: the skew is a strided view of the flat rows (as in
    Transformer-XL), so forward and backward are copies, not gathers and scatter-adds."""
    length = x.shape[-2]
    if length == 1:
        return x
    flat = x.flatten(-2)[..., length - 1 : length - 1 + length * (2 * length - 2)]
    return flat.unflatten(-1, (length, 2 * length - 2))[..., :length]


class WordEmbedding(nn.Embedding):
    """Token embedding that also serves as the tied MLM output layer, so the weight is only
    ever read inside this module's forward (ZeRO-3 safe)."""

    def forward(self, x: torch.Tensor, output_layer=None):
        """Lookup (...,) -> (..., H); with `output_layer`: `output_layer(x, self.weight)` for
        hidden states x (..., H) (a vocabulary head, `model.vocab_head`)."""
        if output_layer is not None:
            return output_layer(x, self.weight)
        return super().forward(x)  # (...,) -> (..., H)


class Embeddings(nn.Module):
    """Word embedding -> LayerNorm -> zero pads -> dropout (HF `DebertaV2Embeddings` with
    position_biased_input=False, type_vocab_size=0). `word_embeddings` is None when the
    embedding table lives elsewhere (RTD `es` sharing); the caller then passes `inputs_embeds`.
    """

    def __init__(self, cfg: DebertaV3Config, with_word_embeddings: bool = True):
        super().__init__()
        self.word_embeddings = (
            WordEmbedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
            if with_word_embeddings
            else None
        )
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        mask: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            if self.word_embeddings is None:
                raise ValueError("this backbone has no word embeddings: pass inputs_embeds")
            inputs_embeds = self.word_embeddings(input_ids)  # (B, L, H)
        x = self.LayerNorm(inputs_embeds)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return self.dropout(x)


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import model.attention_triton  # noqa: F401
    except ImportError as e:
        return f"triton does not import ({e})"
    return None


def triton_unavailable(device: torch.device) -> str | None:
    """Why `attention_impl="triton"` cannot run on `device` (None when it can): it needs the
    triton package and CUDA, or CPU tensors under Triton's interpreter (the tests)."""
    if error := _triton_import_error():
        return error
    from model import attention_triton

    if device.type != "cuda" and not attention_triton.interpreted():
        return f"the Triton kernels run on CUDA (here: {device.type}; TRITON_INTERPRET=1 unset)"
    return None


def fused_unavailable() -> str | None:
    """Why `attention_impl="fused"` cannot run (None when it can): the compiled CPU kernel
    (model/csrc, built by `make venv`) must import."""
    from model import attention_fused

    return attention_fused.unavailable()


# `auto` on the CPU runs the fused kernel from this length on: below it the kernel's
# per-tile overheads (small GEMMs, one task per batch x head) lose to eager's batched
# matmuls (RTD step at 32 x 128 bf16: 0.6x of eager; at 8 x 512: 1.1-1.2x faster; the
# attention block at 2 x 2048: 1.6-3.3x; docs/performance.md)
FUSED_MIN_LENGTH = 512


@functools.cache
def _auto_cpu() -> str:
    """ "fused" when the extension imports, else "eager", saying so once per process."""
    if reason := fused_unavailable():
        logger.warning("attention_impl='auto' runs the eager attention on CPU: %s", reason)
        return "eager"
    return "fused"


def resolve_attention_impl(name: str, device: torch.device, seq_len: int | None = None) -> str:
    """The attention a forward on `device` runs for `DebertaV3Config.attention_impl`: "auto"
    is "triton" on CUDA when triton imports; on CPU "fused" from `FUSED_MIN_LENGTH` tokens on
    when the extension is built (one log line when it is not), else "eager"."""
    if name == "auto":
        if device.type == "cuda":
            return "triton" if _triton_import_error() is None else "eager"
        if device.type != "cpu" or (seq_len is not None and seq_len < FUSED_MIN_LENGTH):
            return "eager"
        return _auto_cpu()
    if name == "triton" and (reason := triton_unavailable(device)):
        raise RuntimeError(f"attention_impl='triton': {reason}")
    if name == "fused":
        if device.type != "cpu":
            raise RuntimeError(f"attention_impl='fused' runs on CPU tensors (here: {device.type})")
        if reason := fused_unavailable():
            raise RuntimeError(f"attention_impl='fused': {reason}")
    return name


class DisentangledSelfAttention(nn.Module):
    """Attention with content->content, content->position and position->content scores
    (DeBERTa eq. 4), scaled by 1/sqrt(3 d) because three terms are summed. The eager path
    below is the reference; `attention_impl` may pick a fused kernel instead, with the same
    semantics: Triton on CUDA (model/attention_triton.py) or C++ on CPU
    (model/attention_fused.py)."""

    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.attention_impl = cfg.attention_impl
        self.buckets = (cfg.position_buckets, cfg.max_relative)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.pos_dropout = Dropout(cfg.hidden_dropout_prob)
        self.probs_dropout = cfg.attention_probs_dropout_prob  # applied in dropout_matmul
        self.scale = 1.0 / math.sqrt(self.head_dim * 3)

    def _heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (heads, B, L, d), contiguous: every attention matmul is then a plain
        batched matmul over heads (positions) or heads x B (content), without broadcasts."""
        return x.unflatten(-1, (self.heads, self.head_dim)).permute(2, 0, 1, 3).contiguous()

    def forward(
        self,
        x: torch.Tensor,  # (B, L, H)
        key_mask: torch.Tensor | None,  # (B, L) bool, True = attend; None = no padding
        rel_table_index: torch.Tensor,  # (2L - 1,) long, rows of rel_embeddings by distance
        rel_embeddings: torch.Tensor,  # (S, H) reachable window of the 2k table
    ) -> torch.Tensor:
        batch, length, hidden = x.shape
        x = autocast_input(x)  # cast once here, not once per projection
        q = self._heads_first(self.query_proj(x))  # (heads, B, L, d)
        k = self._heads_first(self.key_proj(x))  # (heads, B, L, d)
        v = self._heads_first(self.value_proj(x))  # (heads, B, L, d)
        # share_att_key: positions go through the same query/key projections as content;
        # the scale of all three terms is folded into the (small) position tables and the
        # c2c matmul
        rel = self.pos_dropout(rel_embeddings)
        pos_q = self._split(self.query_proj(rel)) * self.scale  # (heads, S, d)
        pos_k = self._split(self.key_proj(rel)) * self.scale  # (heads, S, d)
        impl = resolve_attention_impl(self.attention_impl, x.device, length)
        if impl != "eager":
            ctx = self._kernel(impl, q, k, v, pos_q, pos_k, rel_table_index, key_mask)
            return ctx.permute(1, 2, 0, 3).reshape(batch, length, hidden)  # (B, L, H)
        # Toeplitz tables over distances (gathers on the smallest tensors): (heads, 2L-1, d)
        pos_k = pos_k.index_select(1, rel_table_index)  # column c: distance L-1-c
        pos_q = pos_q.index_select(1, rel_table_index.flip(0))  # column c: distance c-(L-1)

        flat = (self.heads, batch * length, self.head_dim)
        # c2p: query i against the key position delta(i, j)
        c2p = relative_shift((q.view(flat) @ pos_k.transpose(1, 2)).view(*q.shape[:3], -1))
        # p2c: key j against the query position delta(i, j), computed per key, transposed
        p2c = relative_shift((k.view(flat) @ pos_q.transpose(1, 2)).view(*k.shape[:3], -1))
        bias = (c2p + p2c.transpose(-1, -2)).view(-1, length, length)  # (heads B, L, L)
        q, k, v = (t.view(-1, length, self.head_dim) for t in (q, k, v))  # (heads B, L, d)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.scale)  # + c2c
        if key_mask is not None:
            pad = ~key_mask[None, :, None, :]  # (1, B, 1, L)
            scores.view(self.heads, batch, length, length).masked_fill_(
                pad, torch.finfo(scores.dtype).min
            )
        probs = scores.softmax(dim=-1)  # (heads B, L, L)
        ctx = dropout_matmul(probs, v, self.probs_dropout, self.training)  # dropout(probs) @ v
        ctx = ctx.view(self.heads, batch, length, self.head_dim)
        return ctx.permute(1, 2, 0, 3).reshape(batch, length, hidden)  # (B, L, H)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(S, H) -> (heads, S, d)"""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(0, 1)

    def _kernel(self, impl, q, k, v, pos_q, pos_k, rel_table_index, key_mask) -> torch.Tensor:
        """The same attention from a fused kernel: "fused" takes the window's position
        queries and keys and computes c2p and p2c in its tiles; "triton" gathers from c2p and
        p2c against the S window rows (GEMMs here). Returns (heads, B, L, d)."""
        heads, batch, length, d = q.shape
        dropout = self.probs_dropout if self.training else 0.0
        if impl == "fused":
            from model import attention_fused

            q, k, v = (t.view(-1, length, d) for t in (q, k, v))  # (heads B, L, d)
            ctx = attention_fused.disentangled_attention(
                q, k, v, pos_q, pos_k, rel_table_index, key_mask, self.scale, dropout
            )
            return ctx.view(heads, batch, length, d)
        from model import attention_triton

        attention_triton.check_buckets(*self.buckets)
        flat = (heads, batch * length, d)
        c2p = (q.view(flat) @ pos_k.transpose(1, 2)).view(heads * batch, length, -1)  # (N, L, S)
        p2c = (k.view(flat) @ pos_q.transpose(1, 2)).view(heads * batch, length, -1)  # (N, L, S)
        q, k, v = (t.view(-1, length, d) for t in (q, k, v))  # (heads B, L, d)
        ctx = attention_triton.disentangled_attention(
            q, k, v, c2p, p2c, rel_table_index.flip(0),  # rows by distance -(L-1) .. L-1
            key_mask, self.scale, dropout,
        )  # fmt: skip
        return ctx.view(heads, batch, length, d)


class DenseResidualNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual); HF `SelfOutput` and `Output`."""

    def __init__(self, cfg: DebertaV3Config, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.self = DisentangledSelfAttention(cfg)
        self.output = DenseResidualNorm(cfg, cfg.hidden_size)

    def forward(self, x, key_mask, rel_index, rel_embeddings):
        return self.output(self.self(x, key_mask, rel_index, rel_embeddings), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # (B, L, I)


class Layer(nn.Module):
    """Post-LN transformer layer: attention block, then feed-forward block."""

    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseResidualNorm(cfg, cfg.intermediate_size)

    def forward(self, x, key_mask, rel_index, rel_embeddings):
        h = self.attention(x, key_mask, rel_index, rel_embeddings)  # (B, L, H)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, cfg: DebertaV3Config):
        super().__init__()
        self.cfg = cfg
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.rel_embeddings = nn.Embedding(2 * cfg.position_buckets, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # norm_rel_ebd

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        lo, hi = relative_window(x.shape[1], self.cfg)
        rows = torch.arange(lo, hi, device=x.device)
        rel_embeddings = self.LayerNorm(self.rel_embeddings(rows))  # (S, H), norm_rel_ebd
        rel_embeddings = autocast_input(rel_embeddings)  # once for all layers' projections
        rel_index = relative_table_index(x.shape[1], self.cfg, x.device)  # (2L - 1,)
        if bool(key_mask.all()):
            key_mask = None  # packed rows have no padding: skip the (B, heads, L, L) fill
        use_ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if use_ckpt:
                x = checkpoint(layer, x, key_mask, rel_index, rel_embeddings, use_reentrant=False)
            else:
                x = layer(x, key_mask, rel_index, rel_embeddings)
        return x


class DebertaV3Backbone(nn.Module):
    """Embeddings + encoder; `state_dict()` keys equal `transformers.DebertaV2Model`'s.

    `with_word_embeddings=False` builds it without a token table (RTD `es` sharing): then
    `forward` must be given `inputs_embeds`.
    """

    def __init__(self, cfg: DebertaV3Config, with_word_embeddings: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg, with_word_embeddings)
        self.encoder = Encoder(cfg)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L) 1 = token, 0 = pad; None = all 1
        inputs_embeds: torch.Tensor | None = None,  # (B, L, H) instead of input_ids
    ) -> torch.Tensor:
        """Last hidden states (B, L, H)."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
        key_mask = attention_mask.bool()
        x = self.embeddings(input_ids, key_mask, inputs_embeds)  # (B, L, H)
        return self.encoder(x, key_mask)
