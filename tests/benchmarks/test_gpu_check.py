"""benchmarks/gpu_check.py without a GPU: argument handling, the report writer, the guards
that keep one failing part from hiding the others, part 4's checks, and the whole check
end to end on the CPU (`--device cpu --quick`: Triton kernels in the interpreter)."""

import importlib.util
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, run_env

spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks/gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
Section = gpu_check.Section


def test_arguments(tmp_path, capsys):
    args = gpu_check.parse_args([])
    assert (args.device, args.quick, args.parts) == ("cuda", False, [1, 2, 3, 4])
    assert args.out == REPO_ROOT / "benchmarks" / "results-gpu.md"
    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--parts", "4,2", "--workdir",
                                 str(tmp_path)])  # fmt: skip
    assert (args.device, args.quick, args.parts) == ("cpu", True, [2, 4])
    assert args.out == tmp_path / "results-cpu.md"  # a CPU run never overwrites the GPU report
    for bad in ("5", "x", ""):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--parts", bad])
        assert "--parts" in capsys.readouterr().err


def test_report_lists_every_part_with_its_status():
    env = [("torch", "2.11.0 (CUDA 12.8)"), ("triton", "3.6.0")]
    sections = [
        Section(1, "passed", ["| a | b |", "|---|---|", "| 1 | 2 |"], 12.3),
        Section(2, "error", ["```", "Traceback ...", "```"], 1.0),
        Section(4, "FAILED", ["- NO: loss fell"], 30.0),
    ]
    text = gpu_check.render(env, sections, quick=False)
    assert "| torch | 2.11.0 (CUDA 12.8) |" in text and "| triton | 3.6.0 |" in text
    assert f"| 1. {gpu_check.PARTS[1]} | passed | 12 |" in text
    assert f"| 2. {gpu_check.PARTS[2]} | error | 1 |" in text
    assert f"## 4. {gpu_check.PARTS[4]}\n\nStatus: **FAILED**\n\n- NO: loss fell" in text
    assert "--quick" not in text
    assert "`--quick`" in gpu_check.render(env, sections, quick=True)


def test_a_failing_part_becomes_a_section(monkeypatch, tmp_path):
    setup = gpu_check.Setup("cpu", True, tmp_path)

    def broken(setup):
        raise ValueError("kernel exploded")

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, 2, broken)
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, 3, lambda setup: (["| x |"], False))
    error = gpu_check.run_part_guarded(2, setup)
    assert error.status == "error" and "ValueError: kernel exploded" in "\n".join(error.lines)
    assert gpu_check.run_part_guarded(3, setup).status == "FAILED"


def test_one_part_failing_does_not_stop_the_others(monkeypatch, tmp_path):
    out = tmp_path / "report.md"
    seen = []

    def fake_part(part, args):
        seen.append(part)
        assert out.is_file() == (part > 1)  # the report is rewritten after every part
        return Section(part, "error" if part == 2 else "passed", [f"part {part} ran"], 1.0)

    monkeypatch.setattr(gpu_check, "run_part_subprocess", fake_part)
    code = gpu_check.main(["--device", "cpu", "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 1 and seen == [1, 2, 3, 4]
    text = out.read_text()
    assert all(f"part {p} ran" in text for p in (1, 2, 3, 4))


def test_a_part_past_its_time_limit_is_reported(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_check.TIME_LIMITS, 1, 0.1)  # x 3 on the CPU: killed at start-up
    args = gpu_check.parse_args(["--device", "cpu", "--workdir", str(tmp_path)])
    section = gpu_check.run_part_subprocess(1, args)
    assert section.status == "error"
    assert "killed after its time limit of 0.3" in section.lines[0]


def records(losses, steps):
    return [{"step": s, "loss": v, "mlm_loss": v / 5} for s, v in zip(steps, losses, strict=True)]


def test_part4_checks():
    good = records([40, 35, 33, 31], [5, 10, 15, 20])
    assert all(ok for _, ok in gpu_check.judge_run(good, 10, 20))
    checks = dict(gpu_check.judge_run(records([40, 41, 33, 31], [5, 10, 15, 20]), 10, 20))
    assert not checks["loss fell (first vs last log of the first run)"]
    checks = dict(gpu_check.judge_run(records([40, 35, 35, 31], [5, 10, 10, 20]), 10, 20))
    assert not checks["every logged step once, in order"]
    checks = dict(gpu_check.judge_run(records([40, 35], [5, 10]), 10, 20))
    assert not checks["the resumed run reached step 20"]
    assert not checks["the resume continued after its checkpoint"]


@pytest.mark.slow
def test_the_whole_check_on_the_cpu(tmp_path):
    """`--device cpu --quick`: every part runs and passes (about 1.8 min on 2 cores)."""
    out = tmp_path / "report.md"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    text = out.read_text()
    assert proc.returncode == 0, text
    for part, title in gpu_check.PARTS.items():
        assert f"| {part}. {title} | passed |" in text
    assert "| triton | fp32 |" in text and "| fp16 |" in text  # kernels did run (interpreted)
    assert "- yes: the export loads in transformers and runs" in text
    print(f"gpu_check --device cpu --quick: {time.time() - t0:.0f} s")
