"""The loop's pieces with a fake engine in a one-rank gloo world: one optimizer step, the
non-finite skip, the train state, log windows and their metrics, and `train` itself writing
and pruning checkpoints. Each test has a case that fails if the piece were wrong."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from data_pipeline.stream import MicroBatch
from launcher.config import RunConfig
from launcher.train.distributed import DistEnv
from launcher.train.loop import (
    EXIT_NONFINITE,
    EXIT_OK,
    LogWindow,
    Run,
    StepResult,
    TrainState,
    all_reduce_counts,
    train,
    train_step,
    update_state,
    window_metrics,
)
from launcher.train.metrics import MEAN_KEYS, Logger, reduce_means

LANGS = ["de", "en", "zh-Hans"]


@pytest.fixture(scope="module", autouse=True)
def one_rank_world(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeEngine:
    """The parts of DeepSpeed's engine the loop uses, over a real module and AdamW; every
    forward returns the next loss of `losses` (RTD metrics derived from it) and records the
    first uniform of the dropout RNG, so the seeding is observable."""

    def __init__(self, losses, zero_stage=2, applied=True, gas=2):
        self.device = torch.device("cpu")
        self.module = torch.nn.Linear(3, 1)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.losses = list(losses)
        self.stage, self.applied, self.gas = zero_stage, applied, gas
        self.calls: list[str] = []
        self.dropout_draws: list[float] = []
        self.skipped_steps = 0
        self.saved: list[str] = []

    def __call__(self, input_ids, generator):
        self.calls.append("forward")
        self.dropout_draws.append(torch.rand(1).item())
        value = self.losses.pop(0)
        loss = self.module(torch.ones(3)).sum() * 0 + value  # differentiable, = value
        metrics = {k: torch.tensor(value / 10) for k in MEAN_KEYS if k != "loss"}
        return SimpleNamespace(
            loss=loss, num_tokens=torch.tensor(int((input_ids != 0).sum())), **metrics
        )

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")
        if self.calls.count("backward") % self.gas == 0:  # a boundary
            self.optimizer.step()
            self.optimizer.zero_grad()

    def get_lr(self):
        return [0.1]

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return False

    def was_step_applied(self):
        return self.applied

    def gradient_accumulation_steps(self):
        return self.gas

    def get_global_grad_norm(self):
        return 2.5

    def save_checkpoint(self, save_dir, tag, client_state):
        path = f"{save_dir}/{tag}"
        os.makedirs(path)
        torch.save({"client": client_state}, f"{path}/mp_rank_00_model_states.pt")
        self.saved.append(tag)


def micro_batch(step: int, first: int, lang: list[int], pad_tail: int = 0) -> MicroBatch:
    ids = np.full((len(lang), 8), 7, dtype=np.int32)
    if pad_tail:
        ids[:, -pad_tail:] = 0
    per_row = (ids != 0).sum(axis=1)
    lang_tokens = np.bincount(lang, per_row, len(LANGS)).astype(np.int64)
    return MicroBatch(
        input_ids=ids,
        lang=np.array(lang, dtype=np.int16),
        sample_index=np.arange(first, first + len(lang), dtype=np.int64),
        step=step,
        lang_tokens=lang_tokens,
    )


def make_run(tmp_path, **train) -> Run:
    cfg = RunConfig()
    cfg.run.output_dir, cfg.run.name = str(tmp_path), "run"
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 4, 2
    for k, v in train.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return Run(
        cfg=cfg,
        env=DistEnv(0, 1, 0, "single"),
        languages=LANGS,
        data_order={"seed": cfg.run.seed},
        flops_per_sample=1e6,
        peak_flops=1e9,
        logger=Logger(cfg.run_dir, True, False, cfg.train.max_steps),
    )


def test_train_step_accumulates_then_steps_once_and_counts_tokens(tmp_path):
    run = make_run(tmp_path)
    engine = FakeEngine([1.0, 3.0])
    mbs = [micro_batch(5, 20, [0, 1]), micro_batch(5, 22, [1, 2], pad_tail=3)]
    before = [p.detach().clone() for p in engine.module.parameters()]
    result = train_step(engine, mbs, run)
    assert engine.calls == ["forward", "backward", "step", "forward", "backward", "step"]
    assert result.sums["loss"] == 4.0 and result.micro_batches == 2
    assert result.sums["mlm_loss"] == pytest.approx(0.4)
    assert result.tokens == 8 + 8 + 5 + 5
    assert result.lang_tokens == [8, 8 + 5, 5]
    assert (result.nonfinite, result.stop, result.lr) == (False, False, 0.1)
    after = list(engine.module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))  # stepped


def test_each_micro_batch_is_seeded_from_its_samples_and_step(tmp_path):
    run = make_run(tmp_path)
    draws = {}
    for key, mbs in {
        "a": [micro_batch(5, 20, [0, 1]), micro_batch(5, 22, [1, 2])],
        "again": [micro_batch(5, 20, [0, 1]), micro_batch(5, 22, [1, 2])],
        "next_step": [micro_batch(6, 20, [0, 1]), micro_batch(6, 22, [1, 2])],
    }.items():
        engine = FakeEngine([1.0, 1.0])
        train_step(engine, mbs, run)
        draws[key] = engine.dropout_draws
    assert draws["a"] == draws["again"]
    assert draws["a"][0] != draws["a"][1]  # two micro batches, two seeds
    assert draws["next_step"] != draws["a"]
    torch.manual_seed(micro_batch(5, 20, [0, 1]).seed(run.cfg.run.seed))
    assert draws["a"][0] == torch.rand(1).item()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_loss_skips_the_step(tmp_path, zero_stage):
    """ZeRO-0 has no overflow check of its own: the loop puts weights and Adam moments back.
    (The fake engine applies its step whatever the gradients, as ZeRO-0 does; under ZeRO >= 1
    DeepSpeed skips the step itself and says so through was_step_applied.)"""
    run = make_run(tmp_path)
    engine = FakeEngine([1.0, 1.0], zero_stage=zero_stage, applied=zero_stage == 0)
    train_step(engine, [micro_batch(0, 0, [0, 1]), micro_batch(0, 2, [0, 1])], run)
    before = [p.detach().clone() for p in engine.module.parameters()]
    moments = {id(p): s["exp_avg"].clone() for p, s in engine.optimizer.state.items()}
    engine.losses = [float("nan"), 1.0]
    result = train_step(engine, [micro_batch(1, 4, [0, 1]), micro_batch(1, 6, [0, 1])], run)
    assert result.nonfinite
    if zero_stage == 0:  # restored by skip_optimizer_step
        for p, b in zip(engine.module.parameters(), before, strict=True):
            assert torch.equal(p, b)
        for p, s in engine.optimizer.state.items():
            assert torch.equal(s["exp_avg"], moments[id(p)])
    engine.losses = [1.0, 1.0]
    finite = train_step(engine, [micro_batch(2, 8, [0, 1]), micro_batch(2, 10, [0, 1])], run)
    assert finite.nonfinite is (zero_stage != 0)  # applied=False: DeepSpeed skipped it
    if zero_stage == 0:  # negative control: a finite step does move the weights
        assert any(
            not torch.equal(p, b) for p, b in zip(engine.module.parameters(), before, strict=True)
        )


def test_stop_request_is_reported_in_the_step_result(tmp_path):
    run = make_run(tmp_path)
    assert not train_step(FakeEngine([1.0]), [micro_batch(0, 0, [0])], run).stop
    run.stop_requested = True
    assert train_step(FakeEngine([1.0]), [micro_batch(0, 0, [0])], run).stop


def result(nonfinite=False, tokens=10, lang_tokens=(4, 6, 0), loss=2.0) -> StepResult:
    sums = dict.fromkeys(MEAN_KEYS, 0.5) | {"loss": loss}
    return StepResult(sums, 2, nonfinite, False, tokens, list(lang_tokens), 0.1)


def test_update_state_counts_steps_samples_tokens_and_nonfinite_runs():
    state = TrainState()
    for r in (result(), result(nonfinite=True), result(nonfinite=True), result()):
        update_state(state, r, LANGS, global_batch=4)
    assert (state.step, state.consumed_samples, state.tokens) == (4, 16, 40)
    assert state.lang_tokens == {"de": 16, "en": 24, "zh-Hans": 0}
    assert (state.nonfinite_steps, state.nonfinite_in_a_row) == (2, 0)
    update_state(state, result(nonfinite=True), LANGS, global_batch=4)
    assert (state.nonfinite_steps, state.nonfinite_in_a_row) == (3, 1)


def test_log_window_metrics_are_means_over_micro_batches(tmp_path):
    run = make_run(tmp_path)
    window = LogWindow()
    window.add(result(loss=2.0, tokens=10))
    window.add(StepResult(dict.fromkeys(MEAN_KEYS, 1.0), 2, False, False, 30, [10, 20, 0], 0.05))
    state = TrainState(step=2, tokens=40)
    m = window_metrics(FakeEngine([]), window, run, seconds=2.0, state=state)
    assert m["loss"] == pytest.approx((2.0 + 1.0) / 4)  # sums over 4 micro batches
    assert m["mlm_loss"] == pytest.approx((0.5 + 1.0) / 4)
    assert m["lr"] == 0.05 and m["grad_norm"] == 2.5  # the last step's
    assert m["tokens_per_s"] == pytest.approx(40 / (2.0 * 2))
    assert m["samples_per_s"] == pytest.approx(4 / 2.0)
    assert m["mfu"] == pytest.approx(4 * 1e6 / 2.0 / 1e9)


@dataclass
class FakeStream:
    def rank_batches(self, start_sample, global_batch_size, micro_batch_size, **rank_and_step):
        step, first = rank_and_step["start_step"], start_sample
        while True:
            for _ in range(global_batch_size // micro_batch_size):
                yield micro_batch(step, first, [0, 1])
                first += micro_batch_size
            step += 1


def test_train_checkpoints_prunes_and_stops_on_nonfinite_runs(tmp_path):
    run = make_run(tmp_path, train__max_steps=6, checkpoint__every_steps=2, checkpoint__keep_last=1)
    run.cfg.train.max_nonfinite_in_a_row = 2
    engine = FakeEngine([1.0] * 12)
    assert train(engine, FakeStream(), TrainState(), run) == EXIT_OK
    assert engine.saved == ["step_00000002", "step_00000004", "step_00000006"]
    ckpts = run.cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000006"]  # keep_last=1
    marker = json.loads((ckpts / "step_00000006" / "COMPLETE.json").read_text())
    assert marker["step"] == 6 and marker["world_size"] == 1
    lines = (run.cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in lines]
    assert logged == [6]  # log.every_steps=10: only the last step

    state = TrainState(step=6, consumed_samples=24)  # continue, now with two NaN steps
    run.cfg.train.max_steps = 10
    engine = FakeEngine([1.0, 1.0, float("nan"), 1.0, float("nan"), 1.0, 1.0, 1.0])
    assert train(engine, FakeStream(), state, run) == EXIT_NONFINITE
    assert (state.step, state.nonfinite_in_a_row, state.nonfinite_steps) == (9, 2, 2)
    assert engine.saved == ["step_00000008"]  # the stop at step 9 writes no checkpoint


def test_best_checkpoint_by_held_out_metric_is_saved_and_survives_pruning(tmp_path, monkeypatch):
    from launcher.train import loop

    figures = iter([5.0, 4.0, 4.5, 3.9, 5.0])  # mlm_loss at steps 0, 2, 4, 6, 8
    monkeypatch.setattr(loop, "evaluate", lambda *a: {"all": {"mlm_loss": next(figures)}})
    monkeypatch.setattr(Logger, "log_eval", lambda *a: None)
    run = make_run(
        tmp_path,
        train__max_steps=8,
        checkpoint__every_steps=100,
        checkpoint__keep_last=1,
        eval__every_steps=2,
        eval__best_metric="mlm_loss",
    )
    run.eval_data = object()  # evaluation on (evaluate is replaced)
    engine = FakeEngine([1.0] * 16)
    state = TrainState()
    assert train(engine, FakeStream(), state, run) == EXIT_OK
    assert engine.saved == ["step_00000002", "step_00000006", "step_00000008"]  # bests + end
    ckpts = run.cfg.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "best.json",
        "step_00000006",
        "step_00000008",
    ]
    best = json.loads((ckpts / "best.json").read_text())
    assert (best["step"], best["value"], best["metric"]) == (6, 3.9, "mlm_loss")
    assert state.best_value == 3.9


def test_step_reductions_run_on_the_engine_device(monkeypatch):
    """NCCL reduces only CUDA tensors: the per-step reductions are built on the device they
    are given (the engine's), not on the CPU (a "meta" device stands in for CUDA here)."""
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.device.type))
    device = torch.device("meta")
    with pytest.raises(RuntimeError):  # meta tensors hold no values to read back
        all_reduce_counts(0, 0, 5, np.zeros(2, dtype=np.int64), device)
    sums = dict.fromkeys(MEAN_KEYS, 1.0)
    with pytest.raises(RuntimeError):
        reduce_means(sums, 1, device)
    assert seen == ["meta", "meta"]
