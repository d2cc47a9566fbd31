"""The planner against real CPU runs: its model-state memory within 15% of what the run
allocated (`memory/model_states_gb`, `launcher.train.memory.ModelStateProbe`), its peak
within 25% of the run's peak resident set (`memory/rss_gb`, less what the process held
before the model was built, `memory/rss_start_gb`). Negative control: the same planner with
Adam moments of 4 bytes instead of 8 misses the measured model states."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from launcher.config import REPO_ROOT
from launcher.plan.__main__ import assumptions, parse_args
from launcher.plan.estimate import GIB, Cluster, EngineKnobs, Workload, plan, with_changes
from launcher.train.engine import load_ds_configs
from tests.launcher.helpers import base_args, check, metrics, run

pytestmark = pytest.mark.slow
STATES_TOLERANCE, PEAK_TOLERANCE = 0.15, 0.25
BUCKET = 2_000_000  # elements: small enough that the buckets do not dominate the tiny model


@dataclass(frozen=True)
class Case:
    preset: str
    stage: int
    ranks: int
    micro_batch: int = 4

    @property
    def name(self) -> str:
        return f"{self.preset}-z{self.stage}-r{self.ranks}"


# tiny calibrates the CPU runtime's own memory per rank count (libraries, thread pools,
# gloo and DeepSpeed's shared-memory comm buffers: the CPU's CUDA context), see runtime_gb
CALIBRATION = {1: Case("tiny", 0, 1), 2: Case("tiny", 2, 2)}
CASES = [
    *CALIBRATION.values(),
    Case("xsmall", 2, 2),
    Case("xsmall", 3, 2),
    Case("base", 0, 1, micro_batch=2),
]
VOCAB, SEQ_LEN = 2048, 128  # the fixture tokenizer's 2000 rounded up; the shards' length


def ds_config(tmp_path, stage: int) -> str:
    """ds_configs/zero{stage}.json with smaller gradient buckets."""
    doc = json.loads((REPO_ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    z = doc["zero_optimization"]
    if stage:
        z["reduce_bucket_size"] = BUCKET
    if stage == 3:
        z["stage3_prefetch_bucket_size"] = BUCKET
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def planned(case: Case, vocab: int, seq_len: int, ds_path: str, runtime_gb=0.0, **changes):
    """The planner's figures for this run: fp32, its batch, its ds_config, dropout off,
    torch's single-tensor AdamW (2 temporaries of the partition in its step), and the CPU
    runtime's own memory for `runtime_gb` (the planner's reserve for the CUDA context)."""
    work = Workload(
        preset=case.preset,
        seq_len=seq_len,
        global_batch=case.micro_batch * case.ranks,
        vocab_size=vocab,
        dropout=0.0,
        precision="fp32",
    )
    cluster = Cluster(1, case.ranks, gpu_memory_gb=1e6)
    a = assumptions(parse_args(["--preset", case.preset]))
    a = with_changes(a, runtime_gb=runtime_gb, optimizer_workspace=2, **changes)
    knobs = {case.stage: EngineKnobs.from_ds_config(load_ds_configs([ds_path]))}
    stage = plan(work, cluster, a, knobs, (case.stage,)).stages[0]
    # the micro batch of the run, not the largest that would fit
    assert stage.micro_batch == case.micro_batch
    return stage


@pytest.fixture(scope="module")
def measured(tmp_path_factory, shards_dir, tokenizer_dir):
    """Each case's last metrics record, after 3 steps (the probe measures steps 1-3)."""
    root = tmp_path_factory.mktemp("measured")
    cache = {}

    def get(case: Case) -> tuple[dict, str]:
        if case not in cache:
            path = ds_config(root, case.stage)
            args = base_args(
                shards_dir,
                tokenizer_dir,
                root,
                case.name,
                model__preset=case.preset,
                train__global_batch_size=case.micro_batch * case.ranks,
                train__micro_batch_size=case.micro_batch,
                train__max_steps=3,
                checkpoint__every_steps=1000,
                deepspeed__configs=path,
                log__tensorboard="false",
            )
            check(run(args, ranks=case.ranks))
            cache[case] = (metrics(root / case.name)[-1], path)
        return cache[case]

    return get


def relative_error(planned_gb: float, measured_gb: float) -> float:
    return abs(planned_gb - measured_gb) / measured_gb


def grown(record: dict) -> float:
    """Peak resident set less what the process held before the model was built, GiB."""
    return record["rss_gb"] - record["rss_start_gb"]


def runtime_gb(case: Case, measured) -> float:
    """What the tiny run of the same rank count grew by beyond the planner's tensors."""
    tiny = CALIBRATION[case.ranks]
    record, path = measured(tiny)
    return grown(record) - planned(tiny, VOCAB, SEQ_LEN, path).peak / GIB


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_planned_model_states_match_the_run(case, measured):
    record, path = measured(case)
    states = planned(case, VOCAB, SEQ_LEN, path).states.total / GIB
    assert relative_error(states, record["model_states_gb"]) <= STATES_TOLERANCE, (
        f"{case.name}: planned model states {states:.4f} GiB, measured "
        f"{record['model_states_gb']:.4f} GiB"
    )


@pytest.mark.parametrize("case", CASES[len(CALIBRATION) :], ids=lambda c: c.name)
def test_planned_peak_matches_the_run(case, measured):
    record, path = measured(case)
    runtime = runtime_gb(case, measured)
    peak = planned(case, VOCAB, SEQ_LEN, path, runtime_gb=runtime).peak / GIB
    assert relative_error(peak, grown(record)) <= PEAK_TOLERANCE, (
        f"{case.name}: planned peak {peak:.4f} GiB (CPU runtime {runtime:.3f}), measured "
        f"peak resident set growth {grown(record):.4f} GiB"
    )


# Adam moments are half the model states at ZeRO-0 and a third at ZeRO-3 on 2 ranks, so
# halving them moves the plan by 25% and 17%; at ZeRO-2 on 2 ranks (unpartitioned fp32
# weights) only by 14%, inside the tolerance, so that case is not a control.
@pytest.mark.parametrize("case", [CASES[-1], CASES[-2]], ids=lambda c: c.name)
def test_a_wrong_optimizer_state_size_fails_the_check(case, measured):
    """Negative control: 4-byte Adam moments (instead of 2 x 4) must miss the measurement."""
    record, path = measured(case)
    right = planned(case, VOCAB, SEQ_LEN, path).states.total / GIB
    wrong = planned(case, VOCAB, SEQ_LEN, path, adam_state_bytes=4).states.total / GIB
    assert relative_error(right, record["model_states_gb"]) <= STATES_TOLERANCE
    assert relative_error(wrong, record["model_states_gb"]) > STATES_TOLERANCE
