"""Real training runs: one process and `deepspeed --num_gpus 2` (2 CPU ranks, gloo).

Expensive runs are module fixtures shared by the assertions that read them:
`one_rank` and `two_rank` are the same tiny fp32 ZeRO-2 run (global batch 8, dropout off) on
1 rank (micro batch 4 x 2 accumulation steps) and on 2 ranks (micro batch 4 each).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import PYTHON, REPO_ROOT, run_env
from tests.launcher.helpers import base_args, check, losses, metrics, run, weights

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def data(shards_dir, tokenizer_dir):
    return shards_dir, tokenizer_dir


@pytest.fixture(scope="module")
def one_rank(runs, data):
    out = check(run(base_args(*data, runs, "one"), ranks=1))
    return runs / "one", out


@pytest.fixture(scope="module")
def two_rank(runs, data):
    out = check(run(base_args(*data, runs, "two"), ranks=2))
    return runs / "two", out


def run_dir_shape(run_dir):
    ckpts = run_dir / "checkpoints"
    return {
        "top": sorted(p.name for p in run_dir.iterdir()),
        "complete": sorted(p.parent.name for p in ckpts.glob("step_*/COMPLETE.json")),
        "tensorboard": any((run_dir / "tensorboard").glob("events.out.tfevents.*")),
        "steps": [m["step"] for m in metrics(run_dir)],
    }


def test_one_process_and_deepspeed_write_the_same_run_dir(one_rank, two_rank):
    (one, one_out), (two, two_out) = one_rank, two_rank
    assert run_dir_shape(one) == run_dir_shape(two)
    shape = run_dir_shape(two)
    assert shape["top"] == [
        "checkpoints",
        "config.toml",
        "ds_config.json",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert shape["complete"] == ["step_00000002", "step_00000004"]  # keep_last = 2
    assert shape["steps"] == [1, 2, 3, 4]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # each rank: its share of the cores
    assert f"2 rank(s) (env, {threads} threads each)" in two_out
    assert f"1 rank(s) (single, {len(os.sched_getaffinity(0))} threads each)" in one_out
    # DeepSpeed's shm allreduce op was loaded; its 67 MB per-rank buffers are gone afterwards
    assert "deepspeed_shm_comm_op built successfully" in two_out
    port = re.search(r"--master_port=(\d+)", two_out).group(1)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert two_out.count(f"step      1/{STEPS} |") == 1  # console line on rank 0 only
    ds = (two / "ds_config.json").read_text()
    assert '"gradient_accumulation_steps": 1' in ds
    assert '"gradient_accumulation_steps": 2' in (one / "ds_config.json").read_text()


def test_one_rank_and_two_ranks_give_the_same_losses(one_rank, two_rank):
    for key in ("loss", "mlm_loss", "rtd_loss"):
        a, b = losses(one_rank[0], key), losses(two_rank[0], key)
        assert len(a) == len(b) == STEPS
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (key, a, b)
    first, last = losses(two_rank[0])[0], losses(two_rank[0])[-1]
    assert first != last  # training moved (negative control for a frozen model)


def test_tensorboard_tags_have_sane_values(two_rank):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(two_rank[0] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    last = {t: acc.Scalars(t)[-1].value for t in tags}
    for tag in ("loss/total", "loss/mlm", "loss/rtd", "optim/grad_norm", "memory/rss_gb"):
        assert math.isfinite(last[tag]) and last[tag] > 0, tag
    # measured model states (launcher.train.memory): less than the process, more than 0
    assert 0 < last["memory/model_states_gb"] < last["memory/rss_gb"]
    assert 0 < last["memory/rss_start_gb"] < last["memory/rss_gb"]
    for tag in ("acc/generator", "acc/discriminator", "rtd/precision", "rtd/recall"):
        assert 0.0 <= last[tag] <= 1.0, tag
    assert 0.05 < last["rtd/replaced_frac"] < 0.2  # ~15% masked, some samples equal originals
    assert last["optim/lr"] == pytest.approx(1e-3)  # step 4 trains with lr(2) = peak
    for tag in ("perf/tokens_per_s", "perf/samples_per_s", "perf/tflops_per_rank", "perf/mfu"):
        assert last[tag] > 0, tag
    assert last["optim/nonfinite_steps"] == last["optim/skipped_steps"] == 0
    assert last["tokens/total"] == STEPS * 8 * 128  # rows are full: no padding
    langs = [t for t in tags if t.startswith("tokens/") and t != "tokens/total"]
    assert len(langs) == 12
    assert sum(last[t] for t in langs) == last["tokens/total"]
    assert len(acc.Scalars("loss/total")) == STEPS


def test_exact_resume_after_sigterm(runs, data, one_rank):
    """N steps, SIGTERM (checkpoint + exit 0), the same command again: bitwise the same
    losses and final weights as the straight run."""
    import signal
    import time

    from tests.launcher.helpers import start

    args = base_args(*data, runs, "resume")
    proc = start(args, ranks=1)
    deadline = time.time() + 240
    while not metrics(runs / "resume") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal at step" in out
    stopped = metrics(runs / "resume")[-1]["step"]
    assert 1 <= stopped < STEPS, "the signal came too late to test a resume"
    assert (runs / "resume" / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE.json").exists()

    out = check(run(args, ranks=1))
    assert f"resumed from step_{stopped:08d}: step {stopped}" in out
    assert losses(runs / "resume") == losses(one_rank[0])  # bitwise (fp32, CPU)
    straight, resumed = weights(one_rank[0], STEPS), weights(runs / "resume", STEPS)
    assert straight.keys() == resumed.keys()
    moved = weights(one_rank[0], 2)
    assert any(not torch.equal(moved[k], w) for k, w in straight.items())  # weights did change
    for name, w in straight.items():  # bitwise (optim.implementation=auto: torch's AdamW)
        assert torch.equal(resumed[name], w), name


@pytest.mark.parametrize(("source", "ranks"), [("two", 1), ("one", 2)])
def test_universal_checkpoint_changes_the_rank_count(runs, data, source, ranks, request):
    """Resume step 2 of a 2-rank run on 1 rank (and 1 -> 2): the same global samples follow."""
    src, _ = request.getfixturevalue("two_rank" if source == "two" else "one_rank")
    name = f"{source}_to_{ranks}"
    shutil.copytree(src, runs / name)
    shutil.rmtree(runs / name / "checkpoints" / f"step_{STEPS:08d}")
    (runs / name / "metrics.jsonl").write_text("")
    out = check(run(base_args(*data, runs, name), ranks=ranks))
    assert "resumed from step_00000002_universal (universal checkpoint): step 2" in out
    after, before = metrics(runs / name), metrics(src)[2:]
    assert [m["step"] for m in after] == [3, 4]
    assert [m["consumed_samples"] for m in after] == [24, 32]
    for a, b in zip(after, before, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert a["lang_tokens"] == b["lang_tokens"]  # the same samples, language by language


ZERO3_COMMON = {"optim__grad_clip": 0.0, "model__sharing": "gdes"}


@pytest.fixture(scope="module")
def zero3_run(runs, data):
    z3 = base_args(*data, runs, "z3", deepspeed__configs="ds_configs/zero3.json", **ZERO3_COMMON)
    check(run(z3, ranks=2))
    return runs / "z3"


def test_zero3_gdes_matches_zero0_and_keeps_rtd_out_of_generator_embeddings(runs, data, zero3_run):
    """ZeRO-3 (parameters partitioned, gathered per module) vs ZeRO-0, 2 ranks, GDES, no
    clipping (a global norm would couple the two losses): same losses. A ZeRO-3 run with
    rtd_weight=0 trains the same generator, E_G included: the RTD loss never reaches it."""
    common = ZERO3_COMMON
    z0 = base_args(*data, runs, "z0", deepspeed__configs="ds_configs/zero0.json", **common)
    z3_no_rtd = base_args(
        *data,
        runs,
        "z3_no_rtd",
        deepspeed__configs="ds_configs/zero3.json",
        model__rtd_weight=0.0,
        **common,
    )
    check(run(z0, ranks=2))
    check(run(z3_no_rtd, ranks=2))
    a, b = losses(runs / "z0"), losses(zero3_run)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)

    w, w0 = weights(zero3_run, STEPS), weights(runs / "z3_no_rtd", STEPS)
    e_g = "generator.deberta.embeddings.word_embeddings.weight"
    e_delta = "discriminator.embeddings.word_embeddings.weight"
    assert not torch.equal(w[e_g], weights(zero3_run, 2)[e_g])  # E_G was trained
    assert (w[e_delta] - w0[e_delta]).abs().max() > 1e-4  # negative control: RTD trains E_delta
    for name in w:
        if name.startswith("generator."):
            torch.testing.assert_close(w[name], w0[name], rtol=0, atol=1e-6, msg=name)


def test_universal_checkpoint_of_zero3_resumes_on_one_rank(runs, data, zero3_run):
    """A ZeRO-3 checkpoint of 2 ranks (parameters partitioned) continues on 1 rank."""
    name = "z3_to_1"
    shutil.copytree(zero3_run, runs / name)
    shutil.rmtree(runs / name / "checkpoints" / f"step_{STEPS:08d}")
    (runs / name / "metrics.jsonl").write_text("")
    args = base_args(*data, runs, name, deepspeed__configs="ds_configs/zero3.json", **ZERO3_COMMON)
    out = check(run(args, ranks=1))
    assert "resumed from step_00000002_universal (universal checkpoint): step 2" in out
    after, before = metrics(runs / name), metrics(zero3_run)[2:]
    assert [m["step"] for m in after] == [3, 4]
    for a, b in zip(after, before, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
        assert a["lang_tokens"] == b["lang_tokens"]
    resumed, straight = weights(runs / name, STEPS), weights(zero3_run, STEPS)
    for k, w in straight.items():
        torch.testing.assert_close(resumed[k], w, rtol=0, atol=1e-5, msg=k)


def test_zero_offload_matches_zero2(runs, data, two_rank):
    """ZeRO-2 with the optimizer state offloaded to CPU memory, stepped by DeepSpeed's C++ CPU
    Adam (optim.implementation=deepspeed): the same losses as the ZeRO-2 run (torch AdamW)."""
    args = base_args(
        *data,
        runs,
        "offload",
        deepspeed__configs="ds_configs/zero2_offload.json",
        optim__implementation="deepspeed",
    )
    check(run(args, ranks=2))
    ds = json.loads((runs / "offload" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is False
    a, b = losses(runs / "offload"), losses(two_rank[0])
    assert a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)


def test_bf16_tracks_fp32_and_resumes_bitwise(runs, data, two_rank):
    """ZeRO-2 + ds_configs/bf16.json on 2 ranks: bf16 module weights (fp32 master copy in the
    optimizer), losses within 1% of the fp32 run's; stopped after step 2 and resumed, the same
    losses and final weights bit for bit."""
    configs = "ds_configs/zero2.json,ds_configs/bf16.json"
    check(run(base_args(*data, runs, "bf16", deepspeed__configs=configs), ranks=2))
    bf16, fp32 = losses(runs / "bf16"), losses(two_rank[0])
    assert bf16 != fp32  # negative control: bf16 is really in effect
    for a, b in zip(bf16, fp32, strict=True):
        assert abs(a - b) < 0.01 * abs(b), (bf16, fp32)
    module = torch.load(
        runs / "bf16" / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )["module"]
    assert {v.dtype for k, v in module.items() if k.endswith(".weight")} == {torch.bfloat16}

    shutil.copytree(runs / "bf16", runs / "bf16_resumed")
    shutil.rmtree(runs / "bf16_resumed" / "checkpoints" / f"step_{STEPS:08d}")
    log = runs / "bf16_resumed" / "metrics.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # steps 1-2 only
    out = check(run(base_args(*data, runs, "bf16_resumed", deepspeed__configs=configs), ranks=2))
    assert "resumed from step_00000002: step 2" in out
    assert losses(runs / "bf16_resumed") == bf16
    straight, resumed = weights(runs / "bf16", STEPS), weights(runs / "bf16_resumed", STEPS)
    for k, w in straight.items():
        assert w.dtype == torch.float32 and torch.equal(resumed[k], w), k


@pytest.mark.parametrize("zero", ["zero2", "zero0", "zero0,bf16"])
def test_nonfinite_steps_are_skipped_then_stop(runs, data, zero):
    name = f"nan_{zero.replace(',', '_')}"
    args = base_args(
        *data,
        runs,
        name,
        train__max_steps=10,
        train__max_nonfinite_in_a_row=3,
        deepspeed__configs=",".join(f"ds_configs/{z}.json" for z in zero.split(",")),
    )
    done = run(args, ranks=1, faults={"RTDSPEED_FAULT_NONFINITE_STEPS": "1,3,4,5"})  # 0-based
    assert done.returncode == 3, done.stdout[-4000:]
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in total)" in (
        done.stdout
    )
    assert (
        "stopping: 3 non-finite steps in a row (limit train.max_nonfinite_in_a_row=3)"
        in done.stdout
    )
    m = {r["step"]: r for r in metrics(runs / name)}
    assert math.isfinite(m[3]["loss"]) and m[3]["nonfinite_steps"] == 1  # recovered
    assert m[5]["nonfinite_steps"] == 3
    assert 6 not in m  # stopped at the third in a row
    w = weights(runs / name, 4)  # a checkpoint after skipped steps: weights still finite
    assert all(torch.isfinite(t).all() for t in w.values())
    assert w.keys() == weights(runs / name, 2).keys()


def test_killed_rank_fails_fast_and_the_same_command_resumes(runs, data):
    """A rank dies while writing the step-4 checkpoint (SIGKILL, injected): the launcher exits
    non-zero in bounded time and step 4 is not complete. The command again (without the hook)
    resumes from step 2; a rank SIGKILLed from outside mid-run ends that run too; the command
    once more resumes from the newest complete checkpoint and finishes."""
    import signal
    import time

    import psutil

    from tests.launcher.helpers import start

    name, ckpts = "fault", runs / "fault" / "checkpoints"
    args = base_args(*data, runs, name, train__max_steps=8)
    t0 = time.time()
    crashed = run(args, ranks=2, timeout=240, faults={"RTDSPEED_FAULT_KILL_BEFORE_MARKER": "4"})
    assert crashed.returncode != 0 and time.time() - t0 < 200
    assert (ckpts / "step_00000004").is_dir()
    assert not (ckpts / "step_00000004" / "COMPLETE.json").exists()
    # one line from the surviving rank, the launcher's line naming the dead one and its signal,
    # the traceback in the rank's log only
    lost = [line for line in crashed.stdout.splitlines() if "lost contact" in line]
    assert len(lost) == 1, crashed.stdout[-4000:]
    assert lost[0].startswith("rtdspeed: rank 0: lost contact with another rank, which died")
    assert "Last complete checkpoint: step 2 (" in lost[0] and "same command resumes" in lost[0]
    assert "'--local_rank=1'" in crashed.stdout and "exits with return code = -9" in crashed.stdout
    assert "Traceback (most recent call last)" not in crashed.stdout
    assert "Traceback" in (runs / name / "logs" / "rank0.log").read_text()

    proc = start(args, ranks=2)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any(m["step"] >= 5 for m in metrics(runs / name)):
            break
        time.sleep(0.05)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "--local_rank=1" in p.cmdline()
    ]
    assert ranks, "rank 1 not found (run ended too early?)"
    killed_at = time.time()
    ranks[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60  # no hang
    assert "resumed from step_00000002: step 2" in out
    complete = sorted(p.parent.name for p in ckpts.glob("step_*/COMPLETE.json"))
    assert complete and complete[-1] >= "step_00000004"

    out = check(run(args, ranks=2))
    assert f"resumed from {complete[-1]}: step {int(complete[-1][5:])}" in out
    # every step logged once, although steps after the checkpoints were run twice or three times
    lines = (runs / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    events = EventAccumulator(str(runs / name / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, 9))
    by_step = {m["step"]: m["loss"] for m in metrics(runs / name)}
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx(
        [by_step[s] for s in range(1, 9)]
    )


def test_evaluation_changes_no_training_and_the_standalone_figures_are_the_loops(
    runs, data, two_rank, tmp_path
):
    """A 2-rank run with held-out evaluation at steps 0, 2 and 4: training losses bit for bit
    those of the same run without it; every language evaluated; `launcher.evaluate` on the
    checkpoints (one process) gives the figures the loop logged (two ranks)."""
    shards, tok = data
    if not (shards / "valid").is_dir():  # a split of its own, as build_shards writes one
        copy = tmp_path / "shards"
        shutil.copytree(shards, copy)
        shutil.copytree(shards, copy / "valid")
        shards = copy
    name = "evaluated"
    args = base_args(shards, tok, runs, name, eval__every_steps=2)
    out = check(run([*args, "--eval.max_samples_per_language=8"], ranks=2))
    assert losses(runs / name) == losses(two_rank[0])
    records = [json.loads(x) for x in (runs / name / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    languages = json.loads((shards / "valid" / "manifest.json").read_text())["languages"]
    assert set(records[-1]["metrics"]) == {"all", *languages}
    assert re.search(r"eval      4 \| mlm [\d.]+ acc [\d.]+ \| disc [\d.]+ \(prior", out)
    for record in records[1:]:
        report = runs / f"eval_{record['step']}.json"
        cmd = [PYTHON, "-m", "launcher.evaluate", "--run", str(runs / name)]
        cmd += ["--step", str(record["step"]), "--json", str(report)]
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        standalone = json.loads(report.read_text())["metrics"]
        for lang, figures in record["metrics"].items():
            assert standalone[lang] == pytest.approx(figures, rel=1e-5, nan_ok=True), lang


def test_corrupt_shard_stops_the_job_before_training_with_one_message(runs, data, tmp_path):
    shards, tok = data
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    victim = sorted(bad.glob("*.arrow"))[0]
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size and footer: only the hash can tell
    victim.write_bytes(bytes(content))
    done = run(base_args(bad, tok, runs, "corrupt"), ranks=2)
    assert done.returncode != 0
    assert "exits with return code = 4" in done.stdout  # the deepspeed launcher's line
    errors = [line for line in done.stdout.splitlines() if "rtdspeed: data error" in line]
    assert errors == ["rtdspeed: data error: 1 shard(s) of " + f"{bad} do not match the manifest:"]
    assert f"{victim}: content changed since the build" in done.stdout
    assert "Traceback" not in done.stdout
    assert not (runs / "corrupt").exists()  # nothing started


def test_resume_that_changes_the_data_order_is_refused_unless_forced(runs, data, one_rank):
    shutil.copytree(one_rank[0], runs / "reseeded")
    args = base_args(*data, runs, "reseeded", run__seed=7)
    refused = run(args, ranks=1)
    assert refused.returncode == 2
    assert "refusing to resume: these settings changed since the checkpoint" in refused.stdout
    assert "seed: checkpoint 1234 -> now 7" in refused.stdout
    assert "--checkpoint.force_resume=true" in refused.stdout
    forced = check(run([*args, "--checkpoint.force_resume=true"], ranks=1))
    assert "WARNING: forced resume with a changed data order" in forced
    assert "resumed from step_00000004: step 4" in forced
