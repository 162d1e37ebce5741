"""Random-weight runs are flagged where people look: report.html and every overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zsdense.engine.report import RANDOM_WEIGHTS_BANNER, render_report
from zsdense.io.writers import RANDOM_WEIGHTS_MARK, write_outputs


def _rec(key: str, result_meta: dict) -> dict:
    return {
        "key": key,
        "status": "ok",
        "outputs": {},
        "scores": {},
        "meta": {"result": result_meta},
    }


def test_report_banner_only_when_a_record_says_random_weights():
    esc_banner = RANDOM_WEIGHTS_BANNER.split(":")[0]
    plain = render_report([_rec("a.png", {"models": "default"})])
    assert "class='banner'" not in plain
    flagged = render_report(
        [_rec("a.png", {"models": "default"}), _rec("b.png", {"random_weights": True})]
    )
    assert "class='banner'" in flagged and esc_banner in flagged
    multi = render_report([_rec("c.png", {"anomaly": {}, "openvocab": {"random_weights": True}})])
    assert "class='banner'" in multi


def test_overlay_gets_the_mark(tmp_path):
    img = (np.random.RandomState(0).rand(40, 60, 3) * 255).astype(np.uint8)
    mask = np.zeros((40, 60), bool)
    plain = write_outputs(tmp_path / "p", img, fmt="none", mask=mask)
    marked = write_outputs(tmp_path / "m", img, fmt="none", mask=mask, random_weights=True)
    with Image.open(plain["overlay"]) as a, Image.open(marked["overlay"]) as b:
        h_plain, h_marked = a.size[1], b.size[1]
    assert h_plain == 40 and h_marked > 40  # a caption strip with the mark
    cap = write_outputs(tmp_path / "c", img, fmt="none", mask=mask, caption="score 0.5")
    both = write_outputs(
        tmp_path / "b", img, fmt="none", mask=mask, caption="score 0.5", random_weights=True
    )
    a = np.asarray(Image.open(cap["overlay"]).convert("L"), dtype=float)
    b = np.asarray(Image.open(both["overlay"]).convert("L"), dtype=float)
    assert a.shape != b.shape or np.abs(a - b)[40:].mean() > 1.0  # the strip text differs


def test_tiny_anomaly_run_flags_report_and_overlays(tmp_path, capsys, monkeypatch):
    import zsdense.io.writers as writers
    from zsdense.cli.main import main

    captions = []
    real = writers.write_overlay_jpg

    def spy(*args, **kw):
        captions.append(kw.get("caption"))
        return real(*args, **kw)

    monkeypatch.setattr(writers, "write_overlay_jpg", spy)

    d = tmp_path / "d"
    d.mkdir()
    for i in range(2):
        arr = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
    with pytest.raises(SystemExit) as exc:
        main(["anomaly", str(d), "--out", str(tmp_path / "o"), "--models", "tiny", "-q"])
    assert exc.value.code == 0, capsys.readouterr().err
    html = (tmp_path / "o" / "report.html").read_text()
    assert "class='banner'" in html
    assert len(captions) == 2
    assert all(c.startswith("anomaly score") and c.endswith(RANDOM_WEIGHTS_MARK) for c in captions)
