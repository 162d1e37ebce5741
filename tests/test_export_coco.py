"""COCO instances export for the three tasks, loaded back with pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COCO = pytest.importorskip("pycocotools.coco", reason="pycocotools is in the dev extra").COCO
TINY = ["--models", "tiny", "--precision", "fp32"]


def _cli(args, capsys):
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("coco") / "d"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(2):
        a = rng.integers(60, 120, (30 + 6 * i, 38, 3), dtype=np.uint8)
        a[4:14, 6:18] = 240
        Image.fromarray(a).save(d / "sub" / f"p{i}.png")
    return d


def _check(coco_path: Path, out: Path, kind: str, task: str | None = None):
    coco = COCO(str(coco_path))
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r["status"] == "ok"]
    by_key = {img["zsdense_key"]: img for img in coco.dataset["images"]}
    assert len(by_key) == len({r["key"].split("#")[0] for r in ok})
    for rec in ok:
        outs = rec["outputs"][task] if task else rec["outputs"]
        scores = rec["scores"][task] if task else rec["scores"]
        arr = np.asarray(Image.open(out / outs["mask"]))
        img = by_key[rec["key"].split("#")[0]]
        assert (img["height"], img["width"]) == arr.shape
        ann_ids = coco.getAnnIds(imgIds=[img["id"]])
        anns = coco.loadAnns(ann_ids)
        if kind == "refer":
            anns = [a for a in anns if a["text"] == scores["text"]]
            assert len(anns) == (1 if arr.any() else 0)
            if anns:
                assert np.array_equal(coco.annToMask(anns[0]).astype(bool), arr > 0)
            continue
        union = np.zeros(arr.shape, bool)
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            assert m.sum() == a["area"] and not (union & m).any()  # disjoint instances
            ys, xs = np.nonzero(m)
            box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["bbox"] == box
            if kind == "openvocab":
                assert (arr[m] == a["category_id"] - 1).all()
            union |= m
        if kind == "anomaly":
            assert np.array_equal(union, arr > 0)
            manifest = rec["instances"] if not task else rec["instances"][task]
            assert len(anns) == len(manifest) and [a["area"] for a in anns] == [
                i["area"] for i in manifest
            ]
            assert [a["score"] for a in anns] == pytest.approx([i["score_max"] for i in manifest])
        else:
            assert union.all()  # every pixel has a class
    return coco


def test_anomaly_export(data, tmp_path, capsys):
    out = tmp_path / "a"
    args = ["anomaly", data, "--out", out, *TINY, "-q", "--threshold", "0.505"]
    assert _cli(args, capsys)[0] == 0
    code, stdout, err = _cli(["export", "coco", out, "--json"], capsys)
    assert code == 0, err
    path = out / "instances_coco.json"
    assert json.loads(stdout)["files"][str(path)]["images"] == 2
    coco = _check(path, out, "anomaly")
    assert [c["name"] for c in coco.dataset["categories"]] == ["anomaly"]
    # the export follows decide
    assert _cli(["decide", out, "--threshold", "0.51", "-q"], capsys)[0] == 0
    assert _cli(["export", "coco", out, "--to", tmp_path / "x.json"], capsys)[0] == 0
    _check(tmp_path / "x.json", out, "anomaly")


def test_openvocab_export_with_classes_and_skip(data, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(["openvocab", data, "--out", out, *TINY, "-q", "--classes",
                         "background, cat, cup"], capsys)  # fmt: skip
    assert code == 0, err
    assert _cli(["export", "coco", out], capsys)[0] == 0
    coco = _check(out / "instances_coco.json", out, "openvocab")
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [
        (1, "background"), (2, "cat"), (3, "cup")
    ]  # fmt: skip
    assert _cli(["export", "coco", out, "--skip-class", "background", "--to",
                 tmp_path / "nobg.json"], capsys)[0] == 0  # fmt: skip
    nobg = COCO(str(tmp_path / "nobg.json"))
    assert all(a["category_id"] != 1 for a in nobg.dataset["annotations"])


def test_refer_and_multitask_export(data, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(
        "\n".join(
            json.dumps({"image": str(p), "text": t, "id": f"{p.stem}{i}"})
            for p in sorted((data / "sub").glob("*.png"))
            for i, t in enumerate(["the bright square", "the dark part"])
        )
    )
    out = tmp_path / "r"
    code, _, err = _cli(["refer", "--queries", q, "--out", out, *TINY, "-q"], capsys)
    assert code == 0, err
    assert _cli(["export", "coco", out], capsys)[0] == 0
    coco = _check(out / "instances_coco.json", out, "refer")
    assert len(coco.dataset["images"]) == 2  # one image per file, two queries each

    out = tmp_path / "m"
    code, _, err = _cli(["run", data, "--out", out, *TINY, "-q", "--task", "anomaly", "--task",
                         "refer", "--text", "the square"], capsys)  # fmt: skip
    assert code == 0, err
    assert _cli(["export", "coco", out], capsys)[0] == 0
    _check(out / "instances_coco.anomaly.json", out, "anomaly", task="anomaly")
    _check(out / "instances_coco.refer.json", out, "refer", task="refer")
    code, _, err = _cli(["export", "coco", out, "--to", tmp_path / "y.json"], capsys)
    assert code == 2 and "several tasks" in err
