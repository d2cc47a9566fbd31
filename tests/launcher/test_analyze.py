"""The embedding analysis (acceptance 6) on short pretrain.py runs of each sharing mode, and
the comparison script's curves/summary on the same runs. What is certain: under GDES at
step 0 E_D = E_G, so their figures coincide, and after training they differ; under ES they
coincide always; under NES the two tables are independent."""

import json

import pytest
import torch

from launcher.analyze import Embeddings, analyze, avg_pairwise_cosine, from_run, main
from launcher.factory import build_model
from launcher.hf.mapping import to_hf
from launcher.runs import load_run

TOP = (50, 200)


def test_avg_pairwise_cosine_matches_the_definition():
    e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 3, 5, 7, 11, 29])
    u = torch.nn.functional.normalize(e[ids].double(), dim=-1)
    sims = [(u[i] @ u[j]).item() for i in range(6) for j in range(6) if i != j]
    assert avg_pairwise_cosine(e, ids) == pytest.approx(sum(sims) / len(sims), abs=1e-12)
    same = e[ids[:1]].repeat(4, 1)  # identical vectors -> 1
    assert avg_pairwise_cosine(same, torch.arange(4)) == pytest.approx(1.0)


def initial_embeddings(run_dir) -> Embeddings:
    """The run's step-0 weights: the same config and seed build the same initial model."""
    run = load_run(run_dir)
    model = build_model(run.cfg.model, run.cfg.run.seed, run.tokenizer)
    parts = to_hf(model.state_dict(), model.sharing)
    return Embeddings(
        label=f"{run.run_dir.name}@0",
        sharing=model.sharing,
        step=0,
        e_g=parts["generator"]["deberta.embeddings.word_embeddings.weight"],
        e_d=parts["discriminator"]["embeddings.word_embeddings.weight"],
        special_ids=sorted(run.tokenizer.special_ids.values()),
        shards_dir=run.manifest.root,
        vocab_size=run.tokenizer.vocab_size,
    )


@pytest.mark.slow
def test_analysis_on_short_runs_of_each_mode(tmp_path, pretrained_run):
    runs = {mode: pretrained_run(0, mode) for mode in ("gdes", "es", "nes")}
    for mode, run_dir in runs.items():
        start, trained = analyze(initial_embeddings(run_dir), TOP), analyze(from_run(run_dir), TOP)
        assert [r.frequency for r in trained] == ["shards"] * len(TOP)
        assert [r.top_k for r in trained] == list(TOP)
        for r0, r in zip(start, trained, strict=True):
            if mode in ("gdes", "es"):  # one table at step 0
                assert r0.cos_g == r0.cos_d and r0.cos_g_d == pytest.approx(1.0)
            if mode == "gdes":  # E_delta moved away from 0
                assert abs(r.cos_g - r.cos_d) > 1e-6 and r.cos_g_d < 1 - 1e-6
            if mode == "es":  # still one table
                assert r.cos_g == r.cos_d and r.cos_g_d == pytest.approx(1.0)
            if mode == "nes":  # two independent random tables: unrelated per token
                assert r0.cos_g != r0.cos_d
                assert abs(r0.cos_g_d) < 0.1 and abs(r.cos_g_d) < 0.1
    # NES: each figure reads only its own table
    emb = from_run(runs["nes"])
    base = analyze(emb, TOP)
    emb.e_d = torch.randn_like(emb.e_d)
    other = analyze(emb, TOP)
    assert [r.cos_g for r in other] == [r.cos_g for r in base]
    assert [r.cos_d for r in other] != [r.cos_d for r in base]

    out = tmp_path / "analysis"
    args = [a for d in runs.values() for a in ("--run", str(d))]
    assert main([*args, "--top", "50,200", "--out", str(out)]) == 0
    table = (out / "embedding_similarity.md").read_text()
    assert table.count("\n| z0-") == 6 and "avg cos E_G" in table
    rows = json.loads((out / "embedding_similarity.json").read_text())
    assert {r["sharing"] for r in rows} == {"gdes", "es", "nes"}
    png = (out / "embedding_similarity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_comparison_curves_and_summary(tmp_path, pretrained_run):
    """scripts/compare_sharing.py's plot and summary over three runs' metrics.jsonl."""
    import importlib.util

    from tests.conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "compare_sharing", REPO_ROOT / "scripts" / "compare_sharing.py"
    )
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    data = compare.curves({m: pretrained_run(0, m) for m in ("es", "nes", "gdes")})
    assert all(sorted(recs) == [1, 2, 3, 4] for recs in data.values())
    compare.plot_curves(data, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    text = compare.summary(data)
    assert text.count("\n| ") == 4 and "| gdes | 4 |" in text
