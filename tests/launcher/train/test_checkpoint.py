"""Checkpoint bookkeeping without an engine: which tags count as complete, what pruning keeps,
what a resume picks, and the refusal of a resume that changes the data order."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from launcher.train.checkpoint import (
    MARKER,
    ResumeRefused,
    _prune,
    check_data_order,
    complete_tags,
    plan_resume,
)


def make_tag(ckpt_dir, name, complete=True, world_size=1):
    d = ckpt_dir / name
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / MARKER).write_text(json.dumps({"step": int(name[5:13]), "world_size": world_size}))
    return d


def test_only_tags_with_a_marker_are_complete(tmp_path):
    make_tag(tmp_path, "step_00000002")
    make_tag(tmp_path, "step_00000004", complete=False)  # a save that was killed
    make_tag(tmp_path, "step_00000002_universal")  # a conversion, not a training checkpoint
    (tmp_path / "latest").write_text("step_00000004")  # DeepSpeed's file is not trusted
    assert [(s, t) for s, t, _ in complete_tags(tmp_path)] == [(2, "step_00000002")]
    assert complete_tags(tmp_path / "missing") == []


def test_prune_keeps_the_newest_complete_and_a_newer_incomplete(tmp_path):
    for step in (2, 4, 6, 8):
        make_tag(tmp_path, f"step_{step:08d}")
    make_tag(tmp_path, "step_00000002_universal")
    make_tag(tmp_path, "step_00000005", complete=False)  # older than the newest complete
    make_tag(tmp_path, "step_00000010", complete=False)  # a save in progress elsewhere
    _prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000006",
        "step_00000008",
        "step_00000010",
    ]


@pytest.fixture
def one_rank_world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_resume_plan_is_the_newest_complete_checkpoint(tmp_path, one_rank_world):
    ckpts = tmp_path / "checkpoints"
    assert plan_resume(ckpts, world_size=1, rank=0) is None
    make_tag(ckpts, "step_00000002")
    make_tag(ckpts, "step_00000004")
    make_tag(ckpts, "step_00000006", complete=False)
    plan = plan_resume(ckpts, world_size=1, rank=0)
    assert (plan.tag, plan.step, plan.universal) == ("step_00000004", 4, False)


def test_changed_data_order_is_refused_naming_each_change(capsys):
    saved = {"seed": 1, "seq_len": 128, "languages": ["de", "en"], "manifest": "abc"}
    check_data_order(saved, dict(saved), force=False)  # unchanged: fine
    now = {**saved, "seq_len": 512, "languages": ["de", "en", "fr"]}
    with pytest.raises(ResumeRefused) as e:
        check_data_order(saved, now, force=False)
    msg = str(e.value)
    assert "seq_len: checkpoint 128 -> now 512" in msg
    assert "languages: checkpoint ['de', 'en'] -> now ['de', 'en', 'fr']" in msg
    assert "seed" not in msg.split("order of training samples:")[1]
    check_data_order(saved, now, force=True)
    assert "WARNING: forced resume with a changed data order" in capsys.readouterr().out
