"""The planner's arithmetic: parameter counts against the built model, model states against
DeepSpeed's estimators, the micro-batch search, the recipe it writes (read back by the
trainer's config loader and validation), and the command line."""

from __future__ import annotations

import subprocess

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from launcher.config import RunConfig, load_toml, validate
from launcher.plan.__main__ import assumptions, engine_knobs, main, measured_mfu, parse_args
from launcher.plan.estimate import GIB, Cluster, Workload, plan
from launcher.plan.report import recipe
from model import DebertaV3Config, RTDModel, SpecialTokens
from model.shapes import activation_bytes, param_counts
from tests.conftest import PYTHON, REPO_ROOT, run_env

CLUSTER = Cluster(nodes=4, gpus_per_node=8, gpu_memory_gb=80)


def mdeberta_plan(**workload):
    args = parse_args(["--preset", "mdeberta-base"])
    knobs = {s: engine_knobs(s, False, "bf16") for s in range(4)}
    return plan(Workload(preset="mdeberta-base", **workload), CLUSTER, assumptions(args), knobs)


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_parameter_counts_are_the_built_models(sharing):
    cfg = DebertaV3Config.from_preset("tiny")
    model = RTDModel(cfg, SpecialTokens(0, 1, 2, 3, 4, cfg.vocab_size), sharing)
    counts = param_counts(cfg, sharing)
    assert counts.total == sum(p.numel() for p in model.parameters())  # tied counted once
    gen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("generator."))
    assert counts.generator + counts.shared_embedding == gen
    assert counts.delta_embedding == (0 if sharing == "es" else cfg.vocab_size * cfg.hidden_size)


def test_parameter_counts_of_mdeberta_base():
    """The released shapes: a 768-wide table of 251000 rows, an 86M discriminator backbone."""
    counts = param_counts(DebertaV3Config.from_preset("mdeberta-base"))
    assert counts.shared_embedding == counts.delta_embedding == 251000 * 768
    assert counts.largest_module == 251000 * 768
    assert 85e6 < counts.discriminator < 87e6


def test_zero2_states_are_deepspeeds_estimate_and_zero3_differs_by_its_gradient_bytes():
    p = mdeberta_plan()
    psi, n = p.params.total, CLUSTER.world
    z2, z3 = p.stages[2].states, p.stages[3].states
    _, ds2 = estimate_zero2_model_states_mem_needs(psi, 8, 4, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        psi, p.params.largest_module, 8, 4, cpu_offload=False, cpu_offload_params=False
    )
    assert z2.deepspeed_gpu == ds2 and z3.deepspeed_gpu == ds3
    assert z2.total == pytest.approx(ds2, abs=2)
    # ours: 16-bit and fp32 gradient partitions (2 + 4 bytes); DeepSpeed's ZeRO-3 figure: 18/N
    assert z3.total + z3.gathered - ds3 == pytest.approx(2 * psi / n, abs=2)


def test_more_memory_per_device_from_stage_to_stage_is_less():
    totals = [s.states.total for s in mdeberta_plan().stages]
    assert totals == sorted(totals, reverse=True)


def test_largest_micro_batch_is_the_largest_that_fits():
    p = mdeberta_plan()
    s = p.stages[2]
    assert s.fits and s.peak <= s.budget
    assert s.micro_batch * s.grad_accum * CLUSTER.world == 8192
    # twice the micro batch (the next divisor) would not fit
    cfg = p.workload.model_config()
    double = activation_bytes(cfg, 2 * s.micro_batch, 512, act_bytes=2)
    assert s.peak - s.activation.total + double.total > s.budget


def test_activations_grow_with_the_square_of_the_length_only_in_eager():
    cfg = DebertaV3Config.from_preset("base")

    def kept(impl, length):
        return activation_bytes(cfg, 1, length, act_bytes=2, attention=impl).kept

    eager = kept("eager", 2048) / kept("eager", 1024)
    fused = kept("triton", 2048) / kept("triton", 1024)
    assert eager > 3.0 and fused < 2.2


def test_checkpointing_keeps_less():
    full = DebertaV3Config.from_preset("base")
    ckpt = DebertaV3Config.from_preset("base", gradient_checkpointing=True)
    assert (
        activation_bytes(ckpt, 8, 512, act_bytes=2).kept
        < activation_bytes(full, 8, 512, act_bytes=2).kept / 4
    )


def test_communication_by_stage():
    s = mdeberta_plan().stages
    assert s[0].comm.all_reduce > 0 and s[0].comm.reduce_scatter == 0
    # ZeRO-3 all-gathers the weights twice per micro batch
    assert s[3].comm.all_gather == pytest.approx(2 * s[3].grad_accum * s[2].comm.all_gather)


def test_the_recipe_is_a_run_config_the_trainer_accepts(tmp_path):
    p = mdeberta_plan()
    path = tmp_path / "plan.toml"
    path.write_text(recipe(p, p.recommended))
    cfg = RunConfig()
    load_toml(cfg, path)
    validate(cfg, world_size=CLUSTER.world)
    assert cfg.train.micro_batch_size == p.recommended.micro_batch
    assert cfg.model.preset == "mdeberta-base"
    assert f"ds_configs/zero{p.recommended.stage}.json" in cfg.deepspeed.configs
    assert "ds_configs/bf16.json" in cfg.deepspeed.configs


def test_mfu_comes_from_the_gpu_results_when_measured(tmp_path):
    results = tmp_path / "results-gpu.md"
    assert measured_mfu("mdeberta-base", "eager", results) is None
    results.write_text(
        "| preset | batch x len | impl | step ms | tokens/s | MFU | peak GiB | loss |\n"
        "| base | 8 x 512 | eager | 120 | 34133 | 41.0% | 10.00 | 11.000 |\n"
        "| base | 32 x 512 | eager | 450 | 36408 | 43.5% | 30.00 | 11.000 |\n"
    )
    mfu, source = measured_mfu("mdeberta-base", "eager", results)
    assert mfu == pytest.approx(0.435) and "32 x 512" in source


def test_cli_prints_every_stage_and_writes_a_recipe(tmp_path, capsys):
    out = tmp_path / "plan.toml"
    assert (
        main(
            [
                "--preset",
                "xsmall",
                "--nodes",
                "1",
                "--gpus-per-node",
                "2",
                "--global-batch",
                "64",
                "--write-recipe",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for stage in range(4):
        assert f"ZeRO-{stage}" in text
    assert "recommendation:" in text and "MFU: assumed" in text
    assert out.is_file()


def test_the_recipe_passes_the_trainers_dry_run(tmp_path, tokenizer_dir, shards_dir):
    out = tmp_path / "plan.toml"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--seq-len",
                "128",
                "--global-batch",
                "16",
                "--precision",
                "fp32",
                "--zero",
                "2",
                "--write-recipe",
                str(out),
            ]
        )
        == 0
    )
    cmd = [
        PYTHON,
        str(REPO_ROOT / "launcher" / "pretrain.py"),
        "--dry-run",
        f"--config={out}",
        f"--data.shards_dir={shards_dir}",
        f"--data.tokenizer_dir={tokenizer_dir}",
    ]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run passed" in done.stdout


def test_errors_name_the_problem(capsys):
    assert (
        main(["--preset", "base", "--nodes", "3", "--gpus-per-node", "1", "--global-batch", "8"])
        == 2
    )
    assert "not divisible by 3 ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])


def test_offload_moves_the_optimizer_to_the_cpu():
    knobs = engine_knobs(2, True, "bf16")
    assert knobs.offload_optimizer
    w = Workload(preset="mdeberta-base")
    a = assumptions(parse_args(["--preset", "mdeberta-base"]))
    s = plan(w, CLUSTER, a, {2: knobs}, (2,)).stages[0]
    assert s.states.optimizer == 0 and s.states.cpu_per_node > 8 * GIB * 0.1
    assert s.name == "ZeRO-2+offload"
