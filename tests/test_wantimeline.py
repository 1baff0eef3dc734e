"""``benchmarks/wantimeline.py``'s summary, on made-up stages and samples (no server, no link):
what it says of the link's floor, the batches, the drains and the CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import wantimeline  # noqa: E402


def test_the_summary_reads_the_link_batches_and_drains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = 1000.0
    stages = tmp_path / "timeline.jsonl"
    rows = [
        {"stage": "discover", "start": t0 + 0.5, "end": t0 + 0.7, "cpu": 0.1},
        {"stage": "BatchSender._send_until_done 1", "start": t0 + 1, "end": t0 + 3, "thread": "a"},
        {"stage": "BatchSender._send_until_done 2", "start": t0 + 1, "end": t0 + 5, "thread": "b"},
        {"stage": "AckedBytes.drain", "start": t0 + 2.5, "end": t0 + 2.9, "thread": "a"},
        {"stage": "AckedBytes.drain", "start": t0 + 4.0, "end": t0 + 4.5, "thread": "b"},
        {"stage": "BatchSender._post_import", "start": t0 + 1, "end": t0 + 3, "thread": "a"},
        {"stage": "BatchSender._post_import", "start": t0 + 1, "end": t0 + 5, "thread": "b"},
    ]
    stages.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stderr.log").write_text("x DEBUG xnatio.compress: compress auto: 0.75 s in\n")
    sampler = wantimeline.Sampler("lo", 0)
    # 12.5 MB/s from 1 s to 5 s (50 MB), the client at half a core, the server at one
    sampler.rows = [
        (t0 + k * 0.5, int(max(0.0, min(k * 0.5, 5.0) - 1.0) * 12_500_000), k * 0.25, k * 0.5)
        for k in range(13)
    ]
    wantimeline.report(stages, t0, t0 + 6.0, 0, sampler, 0, 100.0, tmp_path)
    out = capsys.readouterr().out
    assert "link: 50.0 MB on the wire, floor 4.00 s at 100 Mbit/s" in out
    batches = "first start 1.00, last start 1.00, first end 3.00, median end 5.00, last end 5.00"
    assert batches in out
    assert "all acknowledged: first 2.90, last 4.50" in out
    assert "answer after last ack: median 0.500 s, max 0.500 s" in out
    assert "compress auto: 0.75 s in" in out
    assert "CPU over the run: client 3.00 s, server 6.00 s" in out
