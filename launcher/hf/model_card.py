"""The README.md model card of an export: what the model is, how it was trained, on what
data, and the final metrics, from the run's config, checkpoint client state, metrics.jsonl
and shard manifest."""

from __future__ import annotations

import json
from pathlib import Path

_METRICS = ("loss", "mlm_loss", "rtd_loss", "gen_acc", "disc_acc", "disc_precision", "disc_recall")


def last_metrics(run_dir: Path, step: int) -> dict | None:
    """The last metrics.jsonl record at or before `step` (None if there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    best = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and "loss" in rec and rec.get("step", 1 << 62) <= step:
            best = rec
    return best


def _data_table(run, client: dict) -> list[str]:
    m = run.manifest
    if m is None:
        return ["The shard manifest was not available at export time."]
    seen = client.get("train_state", {}).get("lang_tokens", {})
    rows = [
        "| language | documents | rows | tokens | tokens trained on |",
        "|---|---:|---:|---:|---:|",
    ]
    for lang in m.languages:
        st = m.stats.get(lang, {})
        rows.append(
            f"| {lang} | {st.get('documents', '?')} | {st.get('rows', '?')} | "
            f"{st.get('tokens', '?')} | {seen.get(lang, 0)} |"
        )
    return [f"Shards: {len(m.shards)} files, sequence length {m.seq_len}.", "", *rows]


def model_card(kind: str, run, step: int, hf_config: dict, client: dict, meta: dict) -> str:
    """README.md for `kind` = "discriminator" or "generator"."""
    cfg = run.cfg
    langs = run.manifest.languages if run.manifest is not None else []
    is_gen = kind == "generator"
    head = "DebertaV2ForMaskedLM" if is_gen else "DebertaV2Model"
    tags = ["deberta-v3", "rtdspeed", "fill-mask" if is_gen else "replaced-token-detection"]
    front = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'fill-mask' if is_gen else 'feature-extraction'}",
    ]
    front += ["language:", *[f"- {lang}" for lang in langs]] if langs else []
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    state = client.get("train_state", {})
    metrics = last_metrics(run.run_dir, step)
    lines = [
        f"# {cfg.run.name}: DeBERTaV3 {cfg.model.preset} {kind} (RTD, {cfg.model.sharing})",
        "",
        (
            "The generator (masked language model) of an ELECTRA-style replaced token detection "
            "run; useful for fill-mask and for continued pretraining."
            if is_gen
            else "The discriminator of an ELECTRA-style replaced token detection run: the "
            "encoder to fine-tune. `rtd_head.safetensors` holds the RTD head (for continued "
            "pretraining; not used by transformers)."
        ),
        "",
        "Trained with rtdspeed (DeBERTaV3, He, Gao, Chen, arXiv 2111.09543). "
        + (
            "Word embedding: E_D = E_G + E_delta (gradient-disentangled embedding sharing)."
            if cfg.model.sharing == "gdes" and not is_gen
            else f"Embedding sharing: {cfg.model.sharing}."
        ),
        "",
        "```python",
        f"from transformers import AutoModel{'ForMaskedLM' if is_gen else ''}, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        f'model = AutoModel{"ForMaskedLM" if is_gen else ""}.from_pretrained("PATH")  # {head}',
        "```",
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        lines.append(f"| {key} | {hf_config[key]} |")
    lines += [
        f"| vocab_size (model / tokenizer) | {hf_config['vocab_size']} / "
        f"{meta['tokenizer_vocab_size']} |",
        f"| position_buckets / max_relative_positions | {hf_config['position_buckets']} / "
        f"{hf_config['max_relative_positions']} |",
        "",
        "## Training",
        "",
        f"Checkpoint step {step} of {cfg.train.max_steps}; "
        f"{state.get('consumed_samples', '?')} samples, {state.get('tokens', '?')} tokens seen. "
        f"Global batch {cfg.train.global_batch_size}, peak lr {cfg.optim.lr}, warmup "
        f"{cfg.optim.warmup_steps}, AdamW betas ({cfg.optim.beta1}, {cfg.optim.beta2}), "
        f"weight decay {cfg.optim.weight_decay}, mask probability {cfg.model.mask_prob}, "
        f"RTD weight {cfg.model.rtd_weight}, seed {cfg.run.seed}, DeepSpeed configs "
        f"{', '.join(cfg.deepspeed.configs)}.",
        "",
    ]
    if metrics:
        lines += ["Final metrics (training batches, step " + str(metrics.get("step")) + "):", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {metrics[k]:.4f} |" for k in _METRICS if k in metrics]
    else:
        lines.append("No metrics were logged up to this step.")
    lines += ["", "## Data", "", *_data_table(run, client), ""]
    config_toml = run.run_dir / "config.toml"
    lines += [
        "<details><summary>Resolved run config (config.toml)</summary>",
        "",
        "```toml",
        config_toml.read_text().rstrip() if config_toml.is_file() else "(missing)",
        "```",
        "",
        "</details>",
        "",
        "## Tokenizer",
        "",
        "sentencepiece unigram (`spm.model`) with `tokenizer.json` pinning the exact encoding "
        f"used in training; special ids {meta['special_ids']}.",
        "",
    ]
    return "\n".join(front + lines)
