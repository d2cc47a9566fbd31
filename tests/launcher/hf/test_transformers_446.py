"""The same export loads with transformers 4.46.x in an isolated install and gives the same
outputs (acceptance 4). The install (pip --target, no dependencies beyond the pinned list) is
cached under ~/.cache/rtdspeed/ so later runs on the machine reuse it; the test skips only
when PyPI cannot be reached."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PYTHON
from tests.launcher.hf.test_export import real_batch
from tests.launcher.hf.test_tokenizer import TRICKY

transformers = pytest.importorskip("transformers")

# transformers 4.46 needs tokenizers < 0.21 and huggingface_hub < 1.0 (which needs requests);
# torch, numpy, safetensors, regex, pyyaml, ... come from the project's environment.
PINS = [
    "transformers==4.46.3",
    "tokenizers==0.20.3",
    "huggingface_hub==0.26.5",
    "requests==2.32.3",
    "urllib3==2.2.3",
    "idna==3.10",
    "charset_normalizer==3.4.0",
    "certifi==2024.8.30",
]
CACHE = Path(os.environ.get("RTDSPEED_CACHE", Path.home() / ".cache" / "rtdspeed"))
OFFLINE_SIGNS = (
    "Could not find a version",
    "No matching distribution",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "Network is unreachable",
    "ConnectionError",
)

SCRIPT = r"""
import json, sys
import numpy as np
import torch
import transformers
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

out, work = sys.argv[1], sys.argv[2]
assert transformers.__version__.startswith("4.46."), transformers.__version__
ids = torch.from_numpy(np.load(f"{work}/ids.npy"))
mask = torch.from_numpy(np.load(f"{work}/mask.npy"))
gen_ids = torch.from_numpy(np.load(f"{work}/gen_ids.npy"))
disc, info_d = AutoModel.from_pretrained(f"{out}/discriminator", output_loading_info=True)
gen, info_g = AutoModelForMaskedLM.from_pretrained(f"{out}/generator", output_loading_info=True)
with torch.no_grad():
    h = disc.eval()(ids, attention_mask=mask).last_hidden_state
    logits = gen.eval()(gen_ids, attention_mask=mask).logits
np.save(f"{work}/hidden.npy", h.numpy())
np.save(f"{work}/logits.npy", logits.numpy())
tok = AutoTokenizer.from_pretrained(f"{out}/discriminator")
texts = json.load(open(f"{work}/texts.json"))
json.dump({
    "version": transformers.__version__,
    "tokenizer_class": type(tok).__name__,
    "missing": sorted(info_d["missing_keys"]) + sorted(info_g["missing_keys"]),
    "unexpected": sorted(info_d["unexpected_keys"]) + sorted(info_g["unexpected_keys"]),
    "ids": tok(texts)["input_ids"],
}, open(f"{work}/result.json", "w"))
"""


def isolated_transformers_446() -> Path:
    """pip --target install of PINS, cached by its pin list; skip if PyPI is unreachable."""
    target = CACHE / "transformers-4.46.3"
    stamp = target / "rtdspeed-pins.txt"
    if stamp.is_file() and stamp.read_text().split() == PINS:
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    proc = subprocess.run(
        [*cmd, "--target", str(tmp), *PINS], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if any(sign in proc.stderr for sign in OFFLINE_SIGNS):
            pytest.skip(f"PyPI unreachable, cannot install {PINS[0]}: {proc.stderr[-300:]}")
        raise AssertionError(f"pip install --target failed:\n{proc.stderr[-2000:]}")
    (tmp / "rtdspeed-pins.txt").write_text("\n".join(PINS) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


@pytest.mark.slow
def test_export_loads_in_transformers_446_with_equal_outputs(tmp_path, exported, shards_dir):
    out = exported(3, "gdes")
    site = isolated_transformers_446()
    ids, mask = real_batch(shards_dir)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, 5::7] = True
    masked &= mask.bool()  # pad positions' outputs are unspecified (and differ by version)
    gen_ids = ids.masked_fill(masked, 4)
    for name, t in (("ids", ids), ("mask", mask), ("gen_ids", gen_ids)):
        np.save(tmp_path / f"{name}.npy", t.numpy())
    (tmp_path / "texts.json").write_text(json.dumps(TRICKY))
    (tmp_path / "check.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [PYTHON, str(tmp_path / "check.py"), str(out), str(tmp_path)],
        cwd=tmp_path,  # not the repo: nothing but the isolated install and the venv
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["version"] == "4.46.3" and res["tokenizer_class"] == "DebertaV2TokenizerFast"
    assert res["missing"] == [] and res["unexpected"] == [], res

    disc = transformers.AutoModel.from_pretrained(out / "discriminator").eval()
    gen = transformers.AutoModelForMaskedLM.from_pretrained(out / "generator").eval()
    with torch.no_grad():
        h = disc(ids, attention_mask=mask).last_hidden_state.numpy()
        logits = gen(gen_ids, attention_mask=mask).logits.numpy()
    keep = mask.bool().numpy()
    h_446 = np.load(tmp_path / "hidden.npy")
    logits_446 = np.load(tmp_path / "logits.npy")
    assert np.abs(h - h_446)[keep].max() <= 1e-5
    assert np.abs(logits - logits_446)[masked.numpy()].max() <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out / "discriminator")
    assert res["ids"] == tok(TRICKY)["input_ids"]
