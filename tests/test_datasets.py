"""Dataset readers on small generated trees, and the restricted unpickler."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.errors import ConfigError, InputError
from zsdense.eval import datasets as D
from zsdense.safe_pickle import safe_load, safe_load_path


def img(path: Path, size=(8, 8), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value,) * 3).save(path)
    return path


def label_png(path: Path, arr: np.ndarray, palette: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in ((i * 7) % 256, (i * 13) % 256, i)])
    im.save(path)
    return path


# ================================================================================== anomaly


def make_mvtec(root: Path) -> None:
    for cat in ("bottle", "screw"):
        img(root / cat / "train" / "good" / "000.png")
        img(root / cat / "test" / "good" / "000.png")
        img(root / cat / "test" / "good" / "001.png")
        img(root / cat / "test" / "crack" / "000.png")
        img(root / cat / "ground_truth" / "crack" / "000_mask.png", mode="L", value=255)


def test_mvtec(tmp_path):
    make_mvtec(tmp_path)
    assert D.detect_anomaly_layout(tmp_path) == "mvtec"
    s = D.read_anomaly(tmp_path)
    assert len(s) == 6 and {x.category for x in s} == {"bottle", "screw"}
    bad = [x for x in s if x.label == 1]
    assert len(bad) == 2 and all(x.defect == "crack" for x in bad)
    assert bad[0].mask_path == tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    assert all(x.mask_path is None for x in s if x.label == 0)
    assert D.load_anomaly_mask(bad[0]).sum() == 64
    good = next(x for x in s if x.label == 0)
    assert D.load_anomaly_mask(good, (8, 8)).sum() == 0 and D.load_anomaly_mask(good).shape == (
        8,
        8,
    )
    only = D.read_anomaly(tmp_path, categories=["screw"])
    assert {x.category for x in only} == {"screw"}
    with pytest.raises(ConfigError, match="not found"):
        D.read_anomaly(tmp_path, categories=["nope"])
    # a single category folder works too
    assert len(D.read_mvtec(tmp_path / "bottle")) == 3


def test_visa(tmp_path):
    img(tmp_path / "candle/Data/Images/Normal/0000.JPG")
    img(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    img(tmp_path / "candle/Data/Masks/Anomaly/000.png", mode="L", value=255)
    img(tmp_path / "candle/Data/Images/Normal/0001.JPG")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )
    assert D.detect_anomaly_layout(tmp_path) == "visa"
    s = D.read_anomaly(tmp_path)
    assert [x.label for x in s] == [0, 1]
    assert s[1].mask_path == tmp_path / "candle/Data/Masks/Anomaly/000.png"
    assert s[0].image_path.name == "0000.JPG" and s[0].category == "candle"


def test_folder_layout(tmp_path):
    root = tmp_path / "widget"
    img(root / "good" / "a.png")
    img(root / "scratch" / "b.png")
    img(root / "dent" / "left" / "c.jpg")
    img(root / "dent" / "d.png")
    img(root / "masks" / "scratch" / "b.png", mode="L", value=255)  # mirrored
    img(root / "masks" / "dent" / "left" / "c.png", mode="L", value=255)  # mirrored, nested
    img(root / "masks" / "d_mask.png", mode="L", value=255)  # flat, _mask suffix
    assert D.detect_anomaly_layout(root) == "folder"
    s = {x.image_path.name: x for x in D.read_anomaly(root)}
    assert s["a.png"].label == 0 and s["a.png"].category == "widget"
    assert s["b.png"].mask_path == root / "masks" / "scratch" / "b.png"
    assert s["c.jpg"].mask_path == root / "masks" / "dent" / "left" / "c.png"
    assert s["c.jpg"].defect == "dent"
    assert s["d.png"].mask_path == root / "masks" / "d_mask.png"


def test_folder_layout_mask_folders_are_not_test_images(tmp_path):
    root = tmp_path / "widget"
    img(root / "good" / "a.png")
    img(root / "good" / "b.png")
    img(root / "scratch" / "c.png")
    img(root / "scratch" / "d.png")
    img(root / "scratch" / "d_mask.png", mode="L", value=255)  # beside its image
    img(root / "dent" / "e.png")
    img(root / "dent" / "ground_truth" / "e.png", mode="L", value=255)  # nested mask folder
    img(root / "ground_truth" / "scratch" / "c_mask.png", mode="L", value=255)  # MVTec-like
    img(root / "ground_truth" / "scratch" / "orphan_mask.png", mode="L", value=255)
    img(root / "GT" / "f.png", mode="L", value=255)
    assert D.detect_anomaly_layout(root) == "folder"
    samples = D.read_anomaly(root)
    s = {x.image_path.relative_to(root).as_posix(): x for x in samples}
    assert sorted(s) == ["dent/e.png", "good/a.png", "good/b.png", "scratch/c.png", "scratch/d.png"]
    assert sum(x.label for x in samples) == 3
    assert s["scratch/c.png"].mask_path == root / "ground_truth" / "scratch" / "c_mask.png"
    assert s["scratch/d.png"].mask_path == root / "scratch" / "d_mask.png"
    assert s["dent/e.png"].mask_path == root / "dent" / "ground_truth" / "e.png"
    assert all(x.category == "widget" for x in samples)


def test_anomaly_layout_not_detected(tmp_path):
    img(tmp_path / "random" / "x.png")
    with pytest.raises(ConfigError, match="cannot tell the dataset layout"):
        D.read_anomaly(tmp_path)
    with pytest.raises(ConfigError, match="unknown anomaly layout"):
        D.read_anomaly(tmp_path, layout="kitti")


# ================================================================================== segmentation


def test_voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for i in ("2007_000032", "2007_000039", "2008_000001"):
        img(root / "JPEGImages" / f"{i}.jpg")
        lab = np.zeros((8, 8))
        lab[2:4] = 15
        lab[0] = 255
        label_png(root / "SegmentationClass" / f"{i}.png", lab)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n")
    assert D.detect_seg_layout(tmp_path / "VOCdevkit") == "voc"
    ds = D.read_segmentation(tmp_path / "VOCdevkit")
    assert ds.layout == "voc" and not ds.reduce_zero_label
    assert [s.id for s in ds.samples] == ["2007_000032", "2007_000039"]
    # the shipped class list of the convention (prompts/classes/voc21.txt)
    assert ds.class_names is not None and len(ds.class_names) == 21
    assert D.class_display_name(ds.class_names[0]) == "background"
    assert D.class_display_name("sofa; couch") == "sofa"
    assert D.read_segmentation(tmp_path / "VOCdevkit", layout="voc20").reduce_zero_label
    lab = D.load_label(ds.samples[0].label_path)
    # palette indices, not colours
    assert lab.dtype == np.int64 and set(np.unique(lab)) == {0, 15, 255}


def test_ade20k_reduce_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    img(root / "images" / "validation" / "ADE_val_00000001.jpg")
    lab = np.array([[0, 1, 2], [150, 255, 3]])
    label_png(root / "annotations" / "validation" / "ADE_val_00000001.png", lab, palette=False)
    assert D.detect_seg_layout(tmp_path) == "ade20k"
    ds = D.read_segmentation(tmp_path)
    assert ds.reduce_zero_label
    out = D.load_label(ds.samples[0].label_path, ds.reduce_zero_label)
    assert out.tolist() == [[255, 0, 1], [149, 255, 2]]


def test_cityscapes_coco_context_generic(tmp_path):
    cs = tmp_path / "cs"
    img(cs / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")
    label_png(
        cs / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png",
        np.full((8, 8), 7),
        palette=False,
    )
    label_png(
        cs / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png",
        np.full((8, 8), 26),
        palette=False,
    )
    ds = D.read_segmentation(cs)
    assert ds.layout == "cityscapes" and len(ds.samples) == 1
    assert ds.samples[0].label_path.name.endswith("_gtFine_labelTrainIds.png")
    assert ds.samples[0].id == "lindau/lindau_000000_000019"
    assert D.load_label(ds.samples[0].label_path).max() == 7

    co = tmp_path / "coco"
    img(co / "images" / "val2017" / "000000000139.jpg")
    label_png(co / "annotations" / "val2017" / "000000000139_instanceTrainIds.png", np.ones((8, 8)))
    ds = D.read_segmentation(co)
    assert ds.layout == "coco-object" and ds.samples[0].label_path is not None

    pc = tmp_path / "pc" / "VOC2010"
    img(pc / "JPEGImages" / "2008_000002.jpg")
    label_png(pc / "SegmentationClassContext" / "2008_000002.png", np.zeros((8, 8)))
    assert D.detect_seg_layout(tmp_path / "pc") == "context"
    assert D.read_segmentation(tmp_path / "pc", layout="context59").reduce_zero_label

    ge = tmp_path / "gen"
    img(ge / "images" / "a.jpg")
    img(ge / "images" / "sub" / "b.png")
    label_png(ge / "labels" / "a.png", np.zeros((8, 8)))
    label_png(ge / "labels" / "sub" / "b.png", np.ones((8, 8)))
    (ge / "classes.txt").write_text("background\ncat\n\n# comment\n")
    ds = D.read_segmentation(ge)
    assert ds.layout == "generic" and ds.class_names == ["background", "cat"]
    assert [s.label_path.name for s in ds.samples] == ["a.png", "b.png"]
    assert D.read_segmentation(ge, reduce_zero_label=True).reduce_zero_label


def test_seg_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot tell the segmentation layout"):
        D.read_segmentation(tmp_path)
    p = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(p)
    with pytest.raises(InputError, match="class indices"):
        D.load_label(p)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="lists no class"):
        D.read_class_file(tmp_path / "empty.txt")


# ================================================================================== referring


def test_refer_jsonl(tmp_path):
    img(tmp_path / "im" / "a.jpg", size=(6, 4))
    m = np.zeros((4, 6), dtype=np.uint8)
    m[1:3, 2:5] = 255
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    # uncompressed RLE, column-major runs starting with background: 4x6 mask, column 1 all set
    rle = {"size": [4, 6], "counts": [4, 4, 16]}
    lines = [
        {"image": "im/a.jpg", "text": "the box", "mask": "a_mask.png", "id": "x1"},
        {"image": "im/a.jpg", "text": "left column", "rle": rle, "id": "x2"},
        {"image": "im/a.jpg", "text": "triangle", "polygon": [[0, 0, 4, 0, 4, 3, 0, 3]]},
    ]
    f = tmp_path / "refs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert D.detect_refer_layout(f) == "jsonl" and D.detect_refer_layout(tmp_path) == "jsonl"
    s = D.read_referring(f)
    assert [x.id for x in s] == ["x1", "x2", "3"]
    assert (s[0].load_mask() == (m > 0)).all()
    expect = np.zeros((4, 6), bool)
    expect[:, 1] = True
    assert (s[1].load_mask() == expect).all()
    poly = s[2].load_mask()
    assert poly.shape == (4, 6) and poly[1, 1] and not poly[:, 5].any()
    f.write_text('{"image": "im/a.jpg", "text": "no gt"}\n')
    with pytest.raises(InputError, match="no ground truth"):
        D.read_referring(f)


def test_compressed_rle_roundtrip():
    pycoco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    m = rng.random((13, 17)) > 0.6
    m[3:9, 4:12] = True
    rle = pycoco.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    assert (D.decode_rle(rle) == m).all()
    with pytest.raises(InputError, match="malformed COCO RLE"):
        D.decode_rle({"size": [13, 17], "counts": [5, 6]})


def make_refcoco(root: Path, protocol: int = 2) -> None:
    im_dir = root.parent / "images" / "mscoco" / "images" / "train2014"
    img(im_dir / "COCO_train2014_000000000009.jpg", size=(10, 8))
    refs = [
        {
            "ref_id": 0,
            "ann_id": 5,
            "image_id": 9,
            "split": "val",
            "category_id": 1,
            "sentences": [
                {"sent": "left dog", "sent_id": 0, "raw": "Left dog"},
                {"sent": "the dog", "sent_id": 1, "raw": "The dog."},
            ],
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000009_5.jpg",
        },
        {
            "ref_id": 1,
            "ann_id": 5,
            "image_id": 9,
            "split": "train",
            "category_id": 1,
            "sentences": [{"sent": "x", "sent_id": 2}],
            "sent_ids": [2],
            "file_name": "y.jpg",
        },
    ]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=protocol)
    inst = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 8, "width": 10}
        ],
        "annotations": [
            {
                "id": 5,
                "image_id": 9,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]],
                "bbox": [1, 1, 5, 4],
            }
        ],
        "categories": [{"id": 1, "name": "dog"}],
    }
    (root / "instances.json").write_text(json.dumps(inst))


def test_refcoco(tmp_path):
    root = tmp_path / "refcoco"
    make_refcoco(root)
    assert D.detect_refer_layout(root) == "refcoco"
    s = D.read_referring(root, split="val")
    assert [x.text for x in s] == ["left dog", "the dog"] and s[1].id == "0_1"
    mask = s[0].load_mask()
    assert mask.shape == (8, 10) and mask[3, 3] and not mask[7, 9]
    with pytest.raises(ConfigError, match="no refs"):
        D.read_referring(root, split="testB")


# ================================================================================== safe pickle


def test_safe_load_plain_data():
    data = {"a": [1, 2.5, (3, None)], "b": True, "c": "text", "d": {"x": [-(2**70)]}}
    for proto in (0, 2, 4, pickle.HIGHEST_PROTOCOL):
        assert safe_load(io.BytesIO(pickle.dumps(data, protocol=proto))) == data
    with_bytes = {"b": b"by", "s": frozenset({1, 2})}
    assert safe_load(io.BytesIO(pickle.dumps(with_bytes, protocol=4))) == with_bytes
    # a Python 2 str (SHORT_BINSTRING opcode) with UTF-8 bytes
    py2 = b"\x80\x02]q\x00U\x05caf\xc3\xa9q\x01a."
    assert safe_load(io.BytesIO(py2)) == ["café"]


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilOpen:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused(tmp_path):
    flag = tmp_path / "pwned"
    payloads = [
        pickle.dumps(_Evil(f"touch {flag}"), protocol=2),
        pickle.dumps([{"ok": 1}, _Evil(f"touch {flag}")], protocol=0),
        pickle.dumps(_EvilOpen(str(flag)), protocol=4),
        # a plain object instance, even of a harmless class, is refused too
        pickle.dumps(ConfigError("x"), protocol=2),
    ]
    for n, data in enumerate(payloads):
        p = tmp_path / f"refs{n}.p"
        p.write_bytes(data)
        with pytest.raises(InputError, match="refused") as err:
            safe_load_path(p)
        assert str(p) in str(err.value)
        assert not flag.exists()
    # the plain unpickler would have run it: the test itself is able to fail
    pickle.loads(payloads[0])
    assert flag.exists()


def test_corrupt_pickle(tmp_path):
    p = tmp_path / "bad.p"
    p.write_bytes(b"\x80\x02}q\x00(U\x01")
    with pytest.raises(InputError, match="bad.p"):
        safe_load_path(p)
    with pytest.raises(InputError, match="cannot read"):
        safe_load_path(tmp_path / "missing.p")


def test_refcoco_malicious_pickle(tmp_path):
    root = tmp_path / "refcoco"
    make_refcoco(root)
    flag = tmp_path / "pwned2"
    (root / "refs(unc).p").write_bytes(pickle.dumps(_Evil(f"touch {flag}"), protocol=2))
    with pytest.raises(InputError, match=r"refs\(unc\)\.p"):
        D.read_referring(root)
    assert not flag.exists()


def test_polygon_fallback_without_pycocotools(monkeypatch):
    import sys

    poly = [[1, 1, 6, 1, 6, 5, 1, 5]]
    with_coco = D.polygons_to_mask(poly, 8, 10)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    without = D.polygons_to_mask(poly, 8, 10)
    assert without[2:5, 2:6].all() and not without[6:, :].any() and not without[:, 8:].any()
    assert (with_coco != without).sum() <= 12  # boundary pixels only
