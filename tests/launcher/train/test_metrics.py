"""metrics.jsonl and TensorBoard after a run continues from an earlier step: every step once."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.train.metrics import Logger, truncate_jsonl


def test_truncate_keeps_steps_up_to_the_resume_step_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # the last line cut by a crash
    assert truncate_jsonl(path, 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert truncate_jsonl(path, 2) == 0 and truncate_jsonl(tmp_path / "none.jsonl", 0) == 0


def test_logger_continuing_from_a_step_replaces_the_later_steps(tmp_path):
    first = Logger(tmp_path, enabled=True, tensorboard=True, max_steps=6)
    for step in range(1, 6):
        first.log(step, {"loss": float(step)}, {})
    first.close()
    again = Logger(tmp_path, enabled=True, tensorboard=True, max_steps=6, start_step=3)
    for step in range(4, 7):
        again.log(step, {"loss": 10.0 + step}, {})
    again.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)
    ]  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0)]
