"""Model configuration for DeBERTaV3 / mDeBERTaV3 (He, Gao, Chen, arXiv 2111.09543).

`DebertaV3Config` uses Hugging Face `DebertaV2Config` field names, so `to_hf_dict()` is a
`config.json` that `transformers.AutoConfig` reads and `from_hf_dict()` reads the released
checkpoints' `config.json`. Only the DeBERTaV3 architecture is implemented (relative
attention with c2p+p2c, shared attention keys, log-bucketed positions, no absolute
positions, no token types); `__post_init__` rejects any other setting by name.

Presets (`DebertaV3Config.PRESETS`, a dict from preset name to field overrides) follow the
paper's Table / the released checkpoints; `tiny` is for tests only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

VOCAB_MULTIPLE = 128
ATTENTION_IMPLS = ("auto", "eager", "fused", "triton")
# fields of this config that are not Hugging Face's: never written into a config.json
_NOT_HF = ("gradient_checkpointing", "attention_impl")
DEBERTA_V3_VOCAB = 128100
MDEBERTA_V3_VOCAB = 251000


def check_attention_impl(name: str) -> None:
    """Raise ValueError (message starting with the field name) for an unknown attention_impl."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={name!r}; choices: {', '.join(ATTENTION_IMPLS)}")


def round_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round a tokenizer's vocabulary size up to a multiple of `multiple` (fast matmuls)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple


_SHAPES = {
    # name: (layers, hidden, heads, ffn)
    "xsmall": (12, 384, 6, 1536),
    "small": (6, 768, 12, 3072),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}


def _preset(shape: str, vocab_size: int) -> dict[str, int]:
    layers, hidden, heads, ffn = _SHAPES[shape]
    return {
        "vocab_size": vocab_size,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
    }


# Fields whose value is fixed by the DeBERTaV3 architecture this package implements.
_V3_FIXED: dict[str, Any] = {
    "relative_attention": True,
    "position_biased_input": False,
    "type_vocab_size": 0,
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
    "pos_att_type": ("p2c", "c2p"),
    "hidden_act": "gelu",
}

# Keys of an HF config.json that carry no model architecture; from_hf_dict ignores them.
_HF_BOOKKEEPING = {
    "model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "id2label", "label2id", "problem_type", "output_hidden_states", "return_dict",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "bos_token_id",
    "eos_token_id", "pooler_dropout", "pooler_hidden_act", "pooler_hidden_size", "legacy",
    "tie_word_embeddings", "embedding_size", "attention_head_size",
}  # fmt: skip


@dataclass
class DebertaV3Config:
    """Discriminator (or generator) backbone shape; HF `DebertaV2Config` field names."""

    vocab_size: int = DEBERTA_V3_VOCAB
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1  # -1 -> max_position_embeddings
    position_buckets: int = 256
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = False
    pad_token_id: int = 0
    gradient_checkpointing: bool = False  # not an HF field: torch.utils.checkpoint per layer
    # not an HF field: the attention kernels (model.backbone.resolve_attention_impl), "auto"
    # (Triton on CUDA when it imports, the fused C++ kernel on CPU from 512 tokens on when
    # built, else eager), "eager", "fused" or "triton"
    attention_impl: str = "auto"

    PRESETS: ClassVar[dict[str, dict[str, int]]] = {
        "tiny": {
            "vocab_size": 1024,
            "num_hidden_layers": 4,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 256,
        },
        **{name: _preset(name, DEBERTA_V3_VOCAB) for name in _SHAPES},
        **{f"mdeberta-{name}": _preset(name, MDEBERTA_V3_VOCAB) for name in _SHAPES},
    }

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):  # HF accepts "p2c|c2p"
            self.pos_att_type = tuple(x.strip() for x in self.pos_att_type.lower().split("|"))
        self.pos_att_type = tuple(self.pos_att_type)
        for name, want in _V3_FIXED.items():
            got = getattr(self, name)
            same = set(got) == set(want) if name == "pos_att_type" else got == want
            if not same:
                raise ValueError(
                    f"DebertaV3Config.{name}={got!r} is not supported: this model implements "
                    f"DeBERTaV3 only, which needs {name}={want!r}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DebertaV3Config.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.position_buckets <= 0:
            raise ValueError(
                f"DebertaV3Config.position_buckets must be > 0, got {self.position_buckets}"
            )
        if self.num_hidden_layers < 1:
            raise ValueError(
                f"DebertaV3Config.num_hidden_layers must be >= 1, got {self.num_hidden_layers}"
            )
        try:
            check_attention_impl(self.attention_impl)
        except ValueError as e:
            raise ValueError(f"DebertaV3Config.{e}") from None

    # -- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_relative(self) -> int:
        """The largest relative distance the log buckets are spread over (512 by default)."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DebertaV3Config:
        """A named preset (see `PRESETS`) with field overrides, e.g. `vocab_size=8064`."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choices: {', '.join(cls.PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown DebertaV3Config field(s) {sorted(unknown)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def generator_config(self) -> DebertaV3Config:
        """The RTD generator: same width, half the depth (paper section 2 / 5.1)."""
        return dataclasses.replace(self, num_hidden_layers=max(1, self.num_hidden_layers // 2))

    # -- Hugging Face config.json -------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict for `transformers.DebertaV2Config` (model_type "deberta-v2")."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _NOT_HF:
            del d[name]
        d["pos_att_type"] = list(self.pos_att_type)
        d.update(
            model_type="deberta-v2",
            pooler_hidden_size=self.hidden_size,
            pooler_dropout=0.0,
            pooler_hidden_act="gelu",
            legacy=True,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DebertaV3Config:
        """Read an HF `config.json` dict; bookkeeping keys are ignored, unknown keys are errors."""
        model_type = d.get("model_type", "deberta-v2")
        if model_type != "deberta-v2":
            raise ValueError(f"model_type {model_type!r} is not 'deberta-v2'")
        names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_HF)
        unknown = set(d) - names - _HF_BOOKKEEPING
        if unknown:
            raise ValueError(f"unknown key(s) in HF config dict: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})
