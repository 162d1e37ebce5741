"""``zsdense refer`` end to end on the bundled scenes with the tiny models: a single query, a
JSONL of queries (two on one image, which reuse its proposals), an unreadable image that fails
alone, and usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, assets_dir) -> list[Path]:
    """Two scene images: the bundled ones when present, generated ones otherwise."""
    src = Path(assets_dir) / "scenes"
    found = sorted(p for p in src.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out = tmp_path_factory.mktemp("scenes")
    paths = []
    if len(found) >= 2:
        for p in found[:2]:
            dst = out / p.name
            shutil.copy(p, dst)
            paths.append(dst)
        return paths
    rng = np.random.default_rng(0)
    for i in range(2):
        img = np.full((96, 128, 3), 100, np.uint8)
        img[10:60, 10 + 30 * i : 60 + 30 * i] = (200, 50, 50)
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        p = out / f"scene{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _invoke(args):
    from zsdense.cli.refer import refer_cmd

    return CliRunner().invoke(
        refer_cmd, [*args, "--models", "tiny", "--device", "cpu", "-q"], catch_exceptions=False
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]


def test_single_query(tmp_path, scenes):
    out = tmp_path / "out"
    res = _invoke([str(scenes[0]), "--text", "the cat on the left", "--out", str(out)])
    assert res.exit_code == 0, res.output
    stem = scenes[0].stem
    mask = np.asarray(Image.open(out / f"{stem}.mask.png"))
    h, w = np.asarray(Image.open(scenes[0])).shape[:2]
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    assert (out / f"{stem}.overlay.jpg").stat().st_size > 0
    (rec,) = _records(out)
    assert rec["status"] == "ok"
    assert rec["scores"]["text"] == "the cat on the left"
    assert rec["meta"]["result"]["relation"] == "left"
    assert rec["meta"]["result"]["random_weights"] is True
    # the random tiny SAM finds no mask on this scene: the whole image stands in, and the line
    # says so (not a success with score 1.0)
    assert rec["fallback"] is True and "no mask" in rec["fallback_reason"]
    assert rec["scores"]["score"] is None and rec["scores"]["candidates"] == []
    assert mask.min() == 255
    report = (out / "report.html").read_text()
    assert "1 fallbacks (not answers)" in report and "ok (fallback)" in report


def test_queries_jsonl_with_an_unreadable_image(tmp_path, scenes):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    qfile = tmp_path / "queries.jsonl"
    lines = [
        {"image": str(scenes[0]), "text": "the red thing", "id": "red"},
        {"image": str(scenes[0]), "text": "the thing on the right"},
        {"image": "broken.png", "text": "a cat", "id": "bad"},
        {"image": str(scenes[1]), "text": "the bright object", "id": "other"},
    ]
    qfile.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out"
    res = _invoke(["--queries", str(qfile), "--out", str(out)])
    assert res.exit_code == 3, res.output  # some queries failed
    recs = {r["key"].split("#")[1]: r for r in _records(out)}
    assert set(recs) == {"red", "2", "bad", "other"}
    assert recs["bad"]["status"] == "error" and "broken.png" in recs["bad"]["error"]
    for k in ("red", "2", "other"):
        assert recs[k]["status"] == "ok", recs[k]
        for path in recs[k]["outputs"].values():
            assert (out / path).exists()
    s0 = scenes[0].stem
    assert (out / f"{s0}.red.mask.png").exists() and (out / f"{s0}.2.mask.png").exists()
    assert recs["other"]["meta"]["result"]["relation"] == "none"  # "bright" is not "right"
    assert recs["2"]["meta"]["result"]["relation"] == "right"
    # the second query on the same image reused SAM, proposals and mask features
    t1 = recs["red"]["meta"]["result"]["timing"]
    t2 = recs["2"]["meta"]["result"]["timing"]
    assert t2["sam_encoder"] < 0.05 and t2["sam_decoder"] < 0.05 and t2["clip_views"] < 0.05
    assert t2["total"] <= 0.2 * t1["total"]
    # a rerun skips everything that is done and retries nothing by default
    res2 = _invoke(["--queries", str(qfile), "--out", str(out)])
    assert res2.exit_code == 3
    assert len(_records(out)) == 4


def test_usage_errors(tmp_path, scenes):
    from zsdense.engine.local import load_queries
    from zsdense.errors import ConfigError

    res = _invoke([str(scenes[0]), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--text" in res.output
    q = tmp_path / "q.jsonl"
    q.write_text('{"image": "a.png"}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl:1: missing \"text\""):
        load_queries(q)
    q.write_text("not json\n")
    with pytest.raises(ConfigError, match="q.jsonl:1: not valid JSON"):
        load_queries(q)
    q.write_text(
        '{"image": "a.png", "text": "x", "id": 1}\n{"image": "b.png", "text": "y", "id": 1}\n'
    )
    with pytest.raises(ConfigError, match="duplicate query id"):
        load_queries(q)
