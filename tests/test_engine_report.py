"""report.html: static, self-contained, every input, failures first, sortable by score."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
from engine_dummy import spec as dummy_spec
from PIL import Image

from zsdense.api import Segmenter
from zsdense.engine.local import items_from_data, load_records, run_batch
from zsdense.engine.report import render_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.srcs: list[str] = []
        self.ext: list[str] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = ""
        if tag == "img":
            self.srcs.append(a["src"])
        if tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.ext.append(a.get("src") or a.get("href"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_lists_every_input_failures_first_with_relative_thumbnails(tmp_path):
    d = tmp_path / "data" / "sub"
    d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.random.RandomState(i).rand(16, 16, 3) * 255).astype(np.uint8)).save(
            d / f"a{i}.png"
        )
    (d / "b<bad>.png").write_bytes(b"")
    seg = Segmenter(device="cpu", models="tiny")
    out = tmp_path / "out"
    run_batch(
        seg, items_from_data([tmp_path / "data"]), out, [dummy_spec(name="d")], progress=False
    )
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Collect()
    p.feed(text)
    header, body = p.rows[0], p.rows[1:]
    assert header[:4] == ["#", "status", "input", "overlay"] and "score" in header
    assert len(body) == 4
    assert body[0][1] == "error" and body[0][2] == "sub/b<bad>.png"  # escaped, parsed back
    assert "empty" in body[0][-1]
    assert [r[1] for r in body[1:]] == ["ok"] * 3
    assert sorted(p.srcs) == [f"sub/a{i}.overlay.jpg" for i in range(3)]
    assert all((out / s).is_file() for s in p.srcs)  # relative links resolve from the page
    assert p.ext == [] and not re.search(r"https?://", text)  # nothing loaded from outside
    assert "<script>" in text and "sortBy" in text
    scores = {r["key"]: r["scores"]["score"] for r in load_records(out) if r["status"] == "ok"}
    col = header.index("score")
    for row in body[1:]:
        assert float(row[col]) == float(f"{scores[row[2]]:.4g}")


def test_render_report_flattens_nested_task_scores():
    recs = [
        {
            "key": "x.png",
            "status": "ok",
            "scores": {"anomaly": {"score": 0.5, "label": True}, "refer": {"score": 0.25}},
            "outputs": {
                "anomaly": {"overlay": "x.anomaly.overlay.jpg"},
                "refer": {"overlay": "x.refer.overlay.jpg"},
            },
        },
    ]
    text = render_report(recs)
    p = _Collect()
    p.feed(text)
    assert {"anomaly.score", "anomaly.label", "refer.score"} <= set(p.rows[0])
    assert p.srcs == ["x.anomaly.overlay.jpg", "x.refer.overlay.jpg"]
    assert "data-v='0.5'" in text
