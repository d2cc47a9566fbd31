"""Config presets, Hugging Face config round trips, error messages and the FLOPs formula."""

import dataclasses

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from model import DebertaV3Backbone, DebertaV3Config, RTDModel, round_vocab, rtd_flops_per_sample
from model.backbone import relative_window
from tests.model.conftest import SPECIAL, make_batch

# Published, rounded parameter counts (DeBERTaV3 / mDeBERTaV3 model cards, paper Table 2):
# (preset, backbone without embeddings, embeddings)
PUBLISHED = [
    ("xsmall", 22e6, 48e6),
    ("small", 44e6, 98e6),
    ("base", 86e6, 98e6),
    ("large", 304e6, 131e6),
    ("mdeberta-base", 86e6, 190e6),
]


@pytest.mark.parametrize(("preset", "backbone", "embeddings"), PUBLISHED)
def test_preset_parameter_counts_within_3_percent(preset, backbone, embeddings):
    with torch.device("meta"):  # no memory, no init cost
        model = DebertaV3Backbone(DebertaV3Config.from_preset(preset))
    counts = {"embeddings": 0, "backbone": 0}
    for name, p in model.named_parameters():
        counts["embeddings" if name.startswith("embeddings.") else "backbone"] += p.numel()
    assert counts["backbone"] == pytest.approx(backbone, rel=0.03)
    assert counts["embeddings"] == pytest.approx(embeddings, rel=0.03)


def test_preset_list_and_shapes():
    assert set(DebertaV3Config.PRESETS) == {
        "tiny", "xsmall", "small", "base", "large",
        "mdeberta-xsmall", "mdeberta-small", "mdeberta-base", "mdeberta-large",
    }  # fmt: skip
    cfg = DebertaV3Config.from_preset("mdeberta-large")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (24, 1024, 16)
    assert (cfg.intermediate_size, cfg.vocab_size) == (4096, 251000)
    assert DebertaV3Config.from_preset("xsmall", vocab_size=8064).vocab_size == 8064


def test_generator_config_is_half_depth_same_width():
    cfg = DebertaV3Config.from_preset("base")
    gcfg = cfg.generator_config()
    assert gcfg.num_hidden_layers == 6 and gcfg.hidden_size == cfg.hidden_size
    assert dataclasses.replace(gcfg, num_hidden_layers=12) == cfg
    assert DebertaV3Config.from_preset("small").generator_config().num_hidden_layers == 3


def test_v3_architecture_defaults():
    cfg = DebertaV3Config.from_preset("xsmall")
    assert cfg.relative_attention and cfg.share_att_key and not cfg.position_biased_input
    assert (cfg.position_buckets, cfg.max_relative, cfg.norm_rel_ebd) == (256, 512, "layer_norm")
    assert set(cfg.pos_att_type) == {"p2c", "c2p"}
    assert (cfg.type_vocab_size, cfg.layer_norm_eps, cfg.initializer_range) == (0, 1e-7, 0.02)


def test_round_vocab():
    assert round_vocab(8000) == 8064
    assert round_vocab(8064) == 8064
    assert round_vocab(128100) == 128128
    assert round_vocab(1) == 128


def test_hf_dict_round_trip_and_transformers_reads_it():
    cfg = DebertaV3Config.from_preset("mdeberta-small", vocab_size=8064)
    d = cfg.to_hf_dict()
    assert d["model_type"] == "deberta-v2"
    assert DebertaV3Config.from_hf_dict(d) == cfg
    hf = transformers.DebertaV2Config(**d)
    for key in ("position_buckets", "share_att_key", "norm_rel_ebd", "pos_att_type"):
        assert getattr(hf, key) == d[key], key
    assert DebertaV3Config.from_hf_dict(hf.to_dict()) == cfg


def test_from_hf_dict_reads_released_style_config():
    """The released deberta-v3 config.json spells pos_att_type as "p2c|c2p"."""
    released = {
        "model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 384, "initializer_range": 0.02,
        "intermediate_size": 1536, "max_position_embeddings": 512, "relative_attention": True,
        "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True,
        "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7, "max_relative_positions": -1,
        "position_biased_input": False, "num_attention_heads": 6, "num_hidden_layers": 12,
        "type_vocab_size": 0, "vocab_size": 128100,
    }  # fmt: skip
    assert DebertaV3Config.from_hf_dict(released) == DebertaV3Config.from_preset("xsmall")


def test_error_messages_name_the_bad_value():
    with pytest.raises(ValueError, match=r"unknown preset 'xxl'; choices: tiny, xsmall, small"):
        DebertaV3Config.from_preset("xxl")
    with pytest.raises(ValueError, match=r"unknown DebertaV3Config field\(s\) \['hiden_size'\]"):
        DebertaV3Config.from_preset("tiny", hiden_size=3)
    with pytest.raises(ValueError, match=r"position_biased_input=True is not supported"):
        DebertaV3Config(position_biased_input=True)
    with pytest.raises(
        ValueError, match=r"hidden_size=100 is not a multiple of num_attention_heads=12"
    ):
        DebertaV3Config(hidden_size=100)
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) in HF config dict: \['conv_kernel_size'\]"
    ):
        DebertaV3Config.from_hf_dict({**DebertaV3Config().to_hf_dict(), "conv_kernel_size": 3})


def test_flops_formula_matches_torch_flop_counter(cfg):
    """Forward matmul FLOPs counted by torch = formula / 3 + the per-batch projection of
    the reachable window of the relative table, which the formula leaves out, + the c2p/p2c
    columns of the Toeplitz tables beyond the S useful ones (2L - 1 distances are scored,
    S <= 2L - 1 distinct rows are useful). Small position_buckets so that L = 64 reaches
    the log-bucketed part of the table."""
    cfg = dataclasses.replace(cfg, position_buckets=32)
    batch, seq_len = 4, 64
    model = RTDModel(cfg, SPECIAL)
    ids, mask = make_batch(batch, seq_len)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    mask_prob = out.num_masked.item() / (batch * seq_len)
    gcfg = cfg.generator_config()
    expected = batch * rtd_flops_per_sample(cfg, gcfg, seq_len, mask_prob) / 3
    layers = cfg.num_hidden_layers + gcfg.num_hidden_layers
    lo, hi = relative_window(seq_len, cfg)
    expected += layers * 2 * (2 * (hi - lo) * cfg.hidden_size**2)
    expected += layers * batch * 4 * seq_len * (2 * seq_len - 1 - (hi - lo)) * cfg.hidden_size
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_flops_xsmall_magnitude():
    cfg = DebertaV3Config.from_preset("xsmall")
    flops = rtd_flops_per_sample(cfg, cfg.generator_config(), 512, 0.15)
    assert 1.5e11 < flops < 1.8e11  # ~164.5 GFLOP per 512-token sample
