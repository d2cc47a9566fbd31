"""Export: error messages, offline loading with transformers (acceptance 1) and numerical
parity with the project's model for checkpoints written under ZeRO 0, 2 and 3 (acceptance 2).
"""

import json
import subprocess

import pytest
import torch
from torch.testing import assert_close

from data_pipeline.stream import ShardStream
from launcher.config import RunConfig, to_toml
from launcher.factory import build_model
from launcher.hf.export import main
from launcher.runs import (
    consolidated_state_dict,
    load_run,
    select_checkpoint,
    weights_only_loading,
)
from model.vocab_head import PlainVocabHead
from tests.conftest import PYTHON, REPO_ROOT, run_env

transformers = pytest.importorskip("transformers")

V3_FIELDS = {
    "model_type": "deberta-v2",
    "relative_attention": True,
    "position_buckets": 256,
    "max_relative_positions": -1,
    "pos_att_type": ["p2c", "c2p"],
    "share_att_key": True,
    "norm_rel_ebd": "layer_norm",
    "position_biased_input": False,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
}


# -- error paths (no training needed) ------------------------------------------------------
def fake_run(tmp_path, tokenizer_dir, shards_dir, tags: dict[int, bool]):
    """A run dir with config.toml and empty checkpoint tags (step -> complete?)."""
    cfg = RunConfig()
    cfg.model.preset = "tiny"
    cfg.data.tokenizer_dir, cfg.data.shards_dir = str(tokenizer_dir), str(shards_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    for step, complete in tags.items():
        d = run / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE.json").write_text(json.dumps({"step": step, "world_size": 1}))
    return run


def test_no_complete_checkpoint_is_an_error(tmp_path, capsys, tokenizer_dir, shards_dir):
    run = fake_run(tmp_path, tokenizer_dir, shards_dir, {6: False})
    assert main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint in" in err and "step_00000006" in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_step_lists_available_steps(tmp_path, capsys, tokenizer_dir, shards_dir):
    run = fake_run(tmp_path, tokenizer_dir, shards_dir, {2: True, 4: True, 6: False})
    assert main(["--run", str(run), "--step", "3", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--step 3: no complete checkpoint for that step" in err
    assert "available steps: 2, 4" in err, err


def test_missing_tokenizer_is_an_error(tmp_path, capsys, tokenizer_dir, shards_dir):
    run = fake_run(tmp_path, tmp_path / "gone", shards_dir, {2: True})
    assert main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer not found" in err and "gone" in err and "--tokenizer DIR" in err, err


def test_not_a_run_dir_and_existing_out(tmp_path, capsys, tokenizer_dir, shards_dir):
    assert main(["--run", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a run directory (no config.toml)" in capsys.readouterr().err
    run = fake_run(tmp_path, tokenizer_dir, shards_dir, {2: True})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    assert main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "use --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"


# -- acceptance 1: offline loading ---------------------------------------------------------
@pytest.mark.slow
def test_cli_export_loads_offline(tmp_path, pretrained_run, monkeypatch):
    """`python -m launcher.hf.export` on a ZeRO-2 run; every Auto class loads offline with no
    missing backbone or MLM-head keys."""
    run = pretrained_run(2, "gdes")
    out = tmp_path / "hf"
    cmd = [PYTHON, "-m", "launcher.hf.export", "--run", str(run), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    disc, gen = out / "discriminator", out / "generator"
    for d in (disc, gen):
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "spm.model", "tokenizer.json"} <= names
        assert {"tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert (disc / "rtd_head.safetensors").is_file()

    cfg = json.loads((disc / "config.json").read_text())
    assert {k: cfg[k] for k in V3_FIELDS} == V3_FIELDS
    assert json.loads((gen / "config.json").read_text())["legacy"] is True
    tok_cfg = json.loads((disc / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "DebertaV2Tokenizer" and tok_cfg["do_lower_case"] is False

    model, info = transformers.AutoModel.from_pretrained(disc, output_loading_info=True)
    assert type(model).__name__ == "DebertaV2Model"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mlm, info = transformers.AutoModelForMaskedLM.from_pretrained(gen, output_loading_info=True)
    assert type(mlm).__name__ == "DebertaV2ForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    clf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        disc, num_labels=3, output_loading_info=True
    )
    assert set(info["missing_keys"]) <= {
        "classifier.weight",
        "classifier.bias",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }, info
    assert not info["unexpected_keys"] and type(clf).__name__.endswith("SequenceClassification")
    for d in (disc, gen):
        tok = transformers.AutoTokenizer.from_pretrained(d)
        assert tok.mask_token_id == 4 and tok.pad_token_id == 0 and tok.cls_token_id == 1
        assert tok("a b").input_ids[0] == 1 and tok("a b").input_ids[-1] == 2
    card = (disc / "README.md").read_text()
    assert "## Data" in card and "| en |" in card and "disc_acc" in card


# -- acceptance 2: parity for ZeRO 0, 2, 3 -------------------------------------------------
def real_batch(shards_dir, n=4):
    """The first `n` training rows; the last one cut short and padded."""
    stream = ShardStream.open(shards_dir)
    mb = next(stream.rank_batches(0, global_batch_size=n, micro_batch_size=n, rank=0, world_size=1))
    ids = torch.from_numpy(mb.input_ids).long()
    ids[-1, 70] = 2  # [SEP]
    ids[-1, 71:] = 0  # [PAD]
    return ids, (ids != 0).long()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_parity_with_project_model(stage, pretrained_run, exported, shards_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, out = pretrained_run(stage, "gdes"), exported(stage, "gdes")
    run = load_run(run_dir)
    step, tag_dir = select_checkpoint(run.run_dir, None)
    ours = build_model(run.cfg.model, run.cfg.run.seed, run.tokenizer)
    ours.load_state_dict(consolidated_state_dict(tag_dir), strict=True)
    ours.eval()
    assert step == 4 and ours.discriminator.embeddings.word_embeddings.weight.abs().max() > 0
    ids, mask = real_batch(shards_dir)
    keep = mask.bool()

    disc_dir = out / "discriminator"
    random_disc = transformers.AutoModel.from_config(
        transformers.AutoConfig.from_pretrained(disc_dir)
    )
    disc = transformers.AutoModel.from_pretrained(disc_dir).eval()
    with torch.no_grad():
        h = ours.discriminator(
            attention_mask=mask, inputs_embeds=ours.discriminator_embeddings(ids)
        )
        h_random = random_disc.eval()(ids, attention_mask=mask).last_hidden_state
        h_hf = disc(ids, attention_mask=mask).last_hidden_state
    assert (h - h_random)[keep].abs().max() > 1e-2  # negative control
    assert (h - h_hf)[keep].abs().max() <= 1e-5

    gen_dir = out / "generator"
    random_gen = transformers.AutoModelForMaskedLM.from_config(
        transformers.AutoConfig.from_pretrained(gen_dir)
    ).eval()
    gen = transformers.AutoModelForMaskedLM.from_pretrained(gen_dir).eval()
    masked = ours.mask_tokens(ids, mask, torch.Generator().manual_seed(0))
    gen_ids = ids.masked_fill(masked, ours.special.mask_id)
    assert masked.sum() > 10
    ours.generator.cls.predictions.vocab_head = PlainVocabHead()  # the head that gives logits
    with torch.no_grad():
        request = ours.vocab_targets(ids, masked, torch.Generator().manual_seed(0))
        logits = ours.generator(gen_ids, mask, masked, request).logits  # (N, V)
        logits_random = random_gen(gen_ids, attention_mask=mask).logits[masked]
        logits_hf = gen(gen_ids, attention_mask=mask).logits[masked]
    assert (logits - logits_random).abs().max() > 1e-2  # negative control
    assert_close(logits_hf, logits, atol=1e-5, rtol=0)


class _ByName:
    """Pickles as `getattr(cls, name)`: how Python 3.11.0-3.11.4 (Debian bookworm's 3.11.2)
    pickle an enum member, e.g. the ZeroStageEnum inside DeepSpeed's optimizer states."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_enum_pickled_by_name_loads_and_other_getattr_is_refused(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"stage": _ByName(ZeroStageEnum, "gradients")}, good)
    torch.save({"x": _ByName(ZeroStageEnum, "__init__")}, bad)
    with pytest.raises(Exception, match="getattr"):  # negative control: torch's own refusal
        torch.load(good, weights_only=True)
    with weights_only_loading():
        assert torch.load(good, weights_only=True)["stage"] is ZeroStageEnum.gradients
        with pytest.raises(Exception, match=r"refused getattr\(.*'__init__'\)"):
            torch.load(bad, weights_only=True)
