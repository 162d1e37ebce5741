"""Writers: atomic files, lossless masks/labels/maps, overlay, COCO RLE vs pycocotools, manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from zsdense.errors import InputError
from zsdense.io import manifest as manifest_mod
from zsdense.io.manifest import (
    Manifest,
    WorkItem,
    base_record,
    error_record,
    is_complete,
    record_key,
)
from zsdense.io.writers import (
    atomic_path,
    jet_colors,
    mask_to_rle,
    rle_to_mask,
    to_jsonable,
    voc_palette,
    write_json,
    write_label_png,
    write_map_npy,
    write_map_tiff,
    write_mask_png,
    write_overlay_jpg,
    write_rle_json,
)

RNG = np.random.default_rng(1)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------------- atomic


def test_atomic_path_success_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "x.mask.png"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".")
        assert tmp.suffix == ".png"  # encoders can infer the format
        assert not final.exists()
        tmp.write_bytes(b"data")
    assert final.read_bytes() == b"data"
    assert _files(final.parent) == ["x.mask.png"]


def test_atomic_path_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    final = tmp_path / "x.json"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(final) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("midway")
    assert final.read_text() == "old"
    assert _files(tmp_path) == ["x.json"]


def test_encoder_failing_midway_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    real_write_bytes = Path.write_bytes

    def half_write(self, data):  # writes some bytes, then dies
        real_write_bytes(self, bytes(data[:8]))
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", half_write)
        with pytest.raises(OSError, match="disk full"):
            write_mask_png(tmp_path / "out" / "m.mask.png", np.ones((4, 4), bool))
    assert _files(tmp_path / "out") == []

    def half_save(self, fp, format=None, **kw):  # Pillow's encoder, the same way
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        write_label_png(tmp_path / "out" / "l.png", np.ones((4, 4), np.uint8))
    assert _files(tmp_path / "out") == []

    import tifffile

    def half_tiff(path, *a, **k):
        Path(path).write_bytes(b"II*\x00partial")
        raise ValueError("encoder crashed")

    monkeypatch.setattr(tifffile, "imwrite", half_tiff)
    with pytest.raises(ValueError):
        write_map_tiff(tmp_path / "out" / "m.map.tiff", np.zeros((2, 2), np.float32))
    assert _files(tmp_path / "out") == []


def test_atomic_path_body_writing_nothing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic_path(tmp_path / "x.bin"):
            pass
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------- masks / maps


def test_mask_png_is_8bit_0_255(tmp_path: Path) -> None:
    m = RNG.random((7, 9)) > 0.5
    p = write_mask_png(tmp_path / "m.mask.png", m)
    with Image.open(p) as im:
        assert im.mode == "L" and im.format == "PNG"
        a = np.asarray(im)
    assert set(np.unique(a)) <= {0, 255}
    np.testing.assert_array_equal(a == 255, m)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        write_mask_png(tmp_path / "bad.png", np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="empty mask"):
        write_mask_png(tmp_path / "empty.png", np.zeros((0, 3), bool))
    assert not (tmp_path / "empty.png").exists()


def test_voc_palette_known_values() -> None:
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert pal[15].tolist() == [192, 128, 128]  # VOC "person"
    assert pal[255].tolist() == [224, 224, 192]  # VOC "void" colour
    assert len({tuple(c) for c in pal}) == 256


def test_label_png_palette_roundtrip_and_limits(tmp_path: Path) -> None:
    lab = RNG.integers(0, 21, (10, 12))
    p = write_label_png(tmp_path / "l.png", lab)
    with Image.open(p) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), lab)
        pal = np.array(im.getpalette()[: 21 * 3]).reshape(-1, 3)
    np.testing.assert_array_equal(pal, voc_palette(21))

    custom = [(1, 2, 3), (250, 251, 252)]
    write_label_png(tmp_path / "c.png", np.array([[0, 1]]), palette=custom)
    with Image.open(tmp_path / "c.png") as im:
        assert np.asarray(im.convert("RGB")).tolist() == [[[1, 2, 3], [250, 251, 252]]]

    big = np.full((2, 2), 256)
    with pytest.raises(ValueError, match="0..255"):
        write_label_png(tmp_path / "big.png", big)
    with pytest.raises(ValueError, match="palette has 2 colours"):
        write_label_png(tmp_path / "p.png", np.array([[0, 2]]), palette=custom)
    assert not (tmp_path / "big.png").exists()


def test_map_tiff_and_npy_lossless(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    a = RNG.standard_normal((20, 30)).astype(np.float32)
    a[0, 0] = np.nan
    write_map_tiff(tmp_path / "a.map.tiff", a)
    b = tifffile.imread(tmp_path / "a.map.tiff")
    assert b.dtype == np.float32 and b.shape == (20, 30)
    np.testing.assert_array_equal(b, a)  # NaN == NaN under assert_array_equal

    k = RNG.random((3, 8, 9)).astype(np.float32)
    write_map_tiff(tmp_path / "k.map.tiff", k, metadata={"class_names": ["a", "b", "c"]})
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "k.map.tiff"), k)
    with tifffile.TiffFile(tmp_path / "k.map.tiff") as t:
        assert t.shaped_metadata[0]["class_names"] == ["a", "b", "c"]

    write_map_npy(tmp_path / "k.probs.npy", k)
    np.testing.assert_array_equal(np.load(tmp_path / "k.probs.npy"), k)
    write_map_npy(tmp_path / "odd.bin", k)  # name used as given, no '.npy' appended
    assert (tmp_path / "odd.bin").exists() and not (tmp_path / "odd.bin.npy").exists()


# ---------------------------------------------------------------------------------- overlay


def test_overlay_heat_labels_mask_legend_caption(tmp_path: Path) -> None:
    img = np.full((64, 96, 3), 0.5, np.float32)
    heat = np.zeros((64, 96), np.float32)
    heat[:, 48:] = 10.0  # right half hot
    p = write_overlay_jpg(tmp_path / "h.overlay.jpg", img, heat=heat)
    with Image.open(p) as im:
        assert im.format == "JPEG" and im.size == (96, 64)
        o = np.asarray(im).astype(float) / 255
    hot, cold = jet_colors(np.array(1.0)), jet_colors(np.array(0.0))
    np.testing.assert_allclose(o[32, 80], 0.5 * 0.5 + 0.5 * hot, atol=0.04)
    np.testing.assert_allclose(o[32, 10], 0.5 * 0.5 + 0.5 * cold, atol=0.04)

    lab = np.zeros((64, 96), int)
    lab[:, 40:] = 2  # "sofa" covers most pixels: first legend entry
    mask = np.zeros((64, 96), bool)
    mask[34:60, 10:40] = True
    write_overlay_jpg(
        tmp_path / "l.overlay.jpg",
        img,
        labels=lab,
        class_names=["bg", "cat", "sofa"],
        mask=mask,
        caption="a caption that is long enough to wrap onto two lines of text",
    )
    with Image.open(tmp_path / "l.overlay.jpg") as im:
        w, h = im.size
        o = np.asarray(im).astype(float)
    assert w == 96 and h > 64  # caption strip added under the image
    assert o[62, 80] == pytest.approx(0.5 * 127.5 + 0.5 * np.array([0, 128, 0]), abs=8)
    assert o[59, 25, 1] > 170 and o[59, 25, 0] < 100  # green outline on the mask border
    assert o[45, 25] == pytest.approx([63.75] * 3, abs=8)  # inside: grey + black label 0
    assert o[9, 9] == pytest.approx([0, 128, 0], abs=35)  # legend swatch of "sofa"
    assert o[4, 40].min() > 200  # legend box is white
    assert o[h - 3, 90].max() < 40  # black strip


def test_jet_endpoints() -> None:
    np.testing.assert_allclose(
        jet_colors(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]], atol=1e-6
    )


# ---------------------------------------------------------------------------------- RLE


def _masks() -> list[np.ndarray]:
    out = [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
    ]
    for _ in range(40):
        h, w = (int(v) for v in RNG.integers(1, 50, 2))
        out.append(RNG.random((h, w)) < RNG.random())
    big = np.zeros((480, 640), bool)
    big[100:400, 30:600] = True
    big[200:210, :] = False
    out.append(big)
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_rle_matches_pycocotools_both_ways() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    for m in _masks():
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        mine = mask_to_rle(m)
        assert mine["size"] == [int(v) for v in ref["size"]]
        assert mine["counts"] == ref["counts"].decode("ascii")
        np.testing.assert_array_equal(rle_to_mask(mine), m)
        np.testing.assert_array_equal(rle_to_mask(ref), m)  # bytes counts accepted
        np.testing.assert_array_equal(
            mask_api.decode({"size": mine["size"], "counts": mine["counts"].encode()}), m
        )
        assert int(mask_api.area(ref)) == int(m.sum())


def test_rle_uncompressed_counts_and_errors() -> None:
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0,1,1,1 -> counts [1, 3]
    np.testing.assert_array_equal(rle_to_mask({"size": [2, 2], "counts": [1, 3]}), m)
    with pytest.raises(ValueError, match="sum to"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})


def test_rle_and_json_are_strict(tmp_path: Path) -> None:
    rle = mask_to_rle(np.eye(4, dtype=bool))
    write_rle_json(tmp_path / "m.rle.json", {"mask": rle, "score": float("nan")})
    text = (tmp_path / "m.rle.json").read_text()
    assert "NaN" not in text
    obj = json.loads(text)
    assert obj["score"] is None
    np.testing.assert_array_equal(rle_to_mask(obj["mask"]), np.eye(4, dtype=bool))

    write_json(
        tmp_path / "x.json",
        {
            "a": np.float32(1.5),
            "b": np.arange(3),
            "c": Path("p"),
            "d": (1, float("inf")),
            "e": np.int64(7),
        },
    )
    assert json.loads((tmp_path / "x.json").read_text()) == {
        "a": 1.5,
        "b": [0, 1, 2],
        "c": "p",
        "d": [1, None],
        "e": 7,
    }
    with pytest.raises(TypeError):
        to_jsonable(object())


# ---------------------------------------------------------------------------------- manifest


def record_ok(path: str, suffix: str = "", **fields) -> dict:
    """An ``ok`` record as the engines write it (base fields + status + the given fields)."""
    item = WorkItem(key=path, path=Path(path), rel=PurePosixPath(path))
    rec = base_record(item, suffix, ["t"], 1)
    rec.update(status="ok", error=None, outputs={}, scores={}, meta={})
    rec.update(fields)
    return rec


def record_error(path: str, exc: BaseException, suffix: str = "") -> dict:
    item = WorkItem(key=path, path=Path(path), rel=PurePosixPath(path))
    return error_record(item, suffix, ["t"], 1, exc)


def test_manifest_append_load_last_wins_and_partial_line(tmp_path: Path) -> None:
    man = Manifest(tmp_path / "out" / "results.jsonl")
    assert man.load() == {}
    man.append(record_error("a.png", InputError("a.png", "file is empty (0 bytes)")))
    man.append(
        record_ok("b.dcm", suffix=".f001", scores={"s": np.float32(0.25), "bad": float("nan")})
    )
    man.append(record_ok("a.png", scores={"image_score": 0.9}))
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(ln) for ln in lines)
    assert "NaN" not in lines[1]

    # simulate a crash mid-write: a trailing partial line
    with open(man.path, "ab") as f:
        f.write(b'{"input": "c.png", "status": "o')
    got = man.load()
    assert set(got) == {"a.png", "b.dcm.f001"}
    assert got["a.png"]["status"] == "ok"  # last record wins
    assert got["b.dcm.f001"]["scores"] == {"s": 0.25, "bad": None}
    assert man.skipped_lines == 1

    man.append(record_ok("c.png"))  # must not be glued onto the fragment
    got = Manifest(man.path).load()
    assert got["c.png"]["status"] == "ok" and len(got) == 3


def test_record_helpers_and_completeness(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "x.mask.png").write_bytes(b"png")
    rec = record_ok(
        "in/sub/x.png",
        outputs={"mask": "sub/x.mask.png", "map": str(out / "m")},
        timing={"total_s": 0.1},
    )
    assert rec["key"] == "in/sub/x.png" and rec["status"] == "ok" and rec["error"] is None
    assert set(rec) >= {"input", "key", "item", "suffix", "status", "error", "outputs", "tasks"}
    man = Manifest(out / "results.jsonl")
    assert not man.is_complete(rec)  # map missing
    (out / "m").write_bytes(b"")
    assert man.is_complete(rec)
    assert not is_complete(rec)  # relative path without a base: not found from cwd

    err = record_error("y.png", ValueError("boom"), suffix=".s003")
    assert err["status"] == "error" and err["error"] == "ValueError: boom"
    assert err["key"] == "y.png.s003" and not man.is_complete(err)
    ue = record_error("z.png", InputError("z.png", "not a valid PNG file"))
    assert ue["error"] == "z.png: not a valid PNG file"
    assert record_key({"input": "q.nii", "suffix": ".s001"}) == "q.nii.s001"

    man.append(rec)
    man.append(err)
    assert man.completed_keys() == {"in/sub/x.png"}


def test_manifest_append_fsyncs(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(manifest_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    Manifest(tmp_path / "r.jsonl").append(record_ok("a.png"))
    assert calls, "append must fsync"


def _wrap_word_by_word(text, draw, font, width):
    """The greedy wrap measured word by word (what the bisection must equal)."""
    from zsdense.io.overlay_text import text_size

    lines = []
    for para in text.splitlines() or [""]:
        cur = ""
        for word in para.split(" "):
            trial = f"{cur} {word}" if cur else word
            if cur and text_size(draw, trial, font)[0] > width:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    return lines


def test_caption_wrap_by_bisection_equals_word_by_word() -> None:
    from PIL import ImageDraw

    from zsdense.io.overlay_text import default_font, wrap

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rng = np.random.default_rng(0)
    vocab = ["a", "score", "0.5312,", "threshold", "", "RANDOM", "WEIGHTS", "-", "x" * 30, "of"]
    texts = ["", " ", "a", "  double  spaces  ", "one\n\ntwo three", "w" * 80]
    texts += [" ".join(rng.choice(vocab, size=int(rng.integers(1, 25)))) for _ in range(60)]
    for size in (10, 16):
        font = default_font(size)
        for width in (16, 40, 120, 300, 640):
            for t in texts:
                assert wrap(t, draw, font, width) == _wrap_word_by_word(t, draw, font, width), (
                    t,
                    width,
                )


def test_caption_that_fits_is_measured_once(monkeypatch) -> None:
    """A caption that fits one line costs one text measurement, shared with its height."""
    from PIL import ImageDraw

    from zsdense.io import overlay_text

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = overlay_text.default_font(12)
    cap = "anomaly score 0.5312, threshold 0.5 (default of crane) - RANDOM WEIGHTS"
    sizes: dict = {}
    assert overlay_text.wrap(cap, draw, font, 10_000, sizes) == [cap]
    assert list(sizes) == [cap]
    calls = []
    real = overlay_text.text_size
    monkeypatch.setattr(overlay_text, "text_size", lambda *a: (calls.append(a[1]), real(*a))[1])
    lines, line_h, strip_h = overlay_text.caption_layout(cap, font, 10_000)
    assert lines == [cap] and calls == [cap]
    assert line_h == real(draw, cap, font)[1] + 4 and strip_h == line_h + 8


def test_default_font_is_loaded_once_per_size_and_thread(tmp_path) -> None:
    """The overlay's font comes from a per-thread cache (bounded), and an overlay drawn with a
    cached font is the same file as one drawn with a freshly loaded font."""
    import threading

    from zsdense.io import overlay_text

    f12 = overlay_text.default_font(12)
    assert overlay_text.default_font(12) is f12 and overlay_text.default_font(13) is not f12
    other: list = []
    t = threading.Thread(target=lambda: other.append(overlay_text.default_font(12)))
    t.start()
    t.join()
    assert other[0] is not f12  # another thread loads its own
    for size in range(20, 20 + overlay_text.FONTS_KEPT + 2):
        overlay_text.default_font(size)
    assert overlay_text.default_font(12) is not f12  # evicted: at most FONTS_KEPT sizes kept
    img = RNG.random((480, 400, 3)).astype(np.float32)  # font size min(480, 400) // 40 = 10
    heat = RNG.random((60, 50)).astype(np.float32)
    cap = "score 0.53 - a caption that needs more than one line " * 3
    write_overlay_jpg(tmp_path / "a.jpg", img, heat=heat, caption=cap)  # loads, then cached
    write_overlay_jpg(tmp_path / "b.jpg", img, heat=heat, caption=cap)
    overlay_text._FONTS.by_size.clear()
    write_overlay_jpg(tmp_path / "c.jpg", img, heat=heat, caption=cap)
    a = (tmp_path / "a.jpg").read_bytes()
    assert a == (tmp_path / "b.jpg").read_bytes() == (tmp_path / "c.jpg").read_bytes()


@pytest.mark.parametrize("width", [1, 2, 3])
def test_mask_outline_is_the_mask_less_its_erosion(width) -> None:
    """The outline drawn on overlays: mask minus its cross erosion (border = background), as
    scipy computes it, and painted exactly on those pixels."""
    from scipy import ndimage

    from zsdense.io.writers import _blend, _Layers, _outline

    rng = np.random.default_rng(width)
    cross = ndimage.generate_binary_structure(2, 1)
    for shape in [(41, 57), (1, 6), (2, 2), (5, 1), (3, 3)]:
        m = rng.random(shape) > 0.35
        want = m & ~ndimage.binary_erosion(m, cross, iterations=width, border_value=0)
        assert np.array_equal(_outline(m, width), want), shape
    img = rng.random((41, 57, 3), dtype=np.float32)
    m = np.zeros((41, 57), bool)
    m[5:30, 10:50] = True
    m[33:40, 2:6] = True
    color = np.array([0, 255, 0], np.uint8)
    for step in (4, 41):  # strips of rows: the outline of a strip needs the rows around it
        plain = _blend(img, _Layers(), step, 0, color, 0.5)
        drawn = _blend(img, _Layers(mask=m, width=width), step, 0, color, 0.5)
        edge = m & ~ndimage.binary_erosion(m, cross, iterations=width, border_value=0)
        assert np.array_equal(drawn[edge], np.broadcast_to(color, (int(edge.sum()), 3)))
        assert np.array_equal(drawn[~edge], plain[~edge])


def test_overlay_blend_in_place_equals_the_formula() -> None:
    """The strip blend (in place, float32) gives the bytes of the plain expression."""
    from zsdense.io.writers import _blend, _Layers, _palette_array, jet_colors

    rng = np.random.default_rng(1)
    img = rng.random((37, 29, 3), dtype=np.float32) * 1.2 - 0.1  # some values outside [0, 1]
    heat = rng.random((37, 29), dtype=np.float32) * 3 - 1
    heat[5, 7] = np.nan
    img[0] = 1.0  # white rows under the hottest heat: sums of weights within ulps of 1
    heat[0, ::2] = 1.5
    lab = rng.integers(0, 4, (37, 29)).astype(np.uint8)
    pal = _palette_array(None, 4)
    pal[3] = 255
    # weights in [0, 1] (the blend then skips the final clip), and outside (it clips)
    for alpha in (0.5, 0.3, 0.7, 0.1, 1.0, 0.0, 1.3, -0.2):
        for with_heat, with_labels in ((True, False), (False, True), (True, True)):
            layers = _Layers(lo=-0.5, hi=1.5)
            want = np.clip(img, 0.0, 1.0)
            if with_heat:
                layers.heat = heat
                finite = np.isfinite(heat)
                norm = np.where(finite, (heat - layers.lo) / (layers.hi - layers.lo), 0.0)
                want = (1.0 - alpha) * want + alpha * jet_colors(norm)
            if with_labels:
                layers.labels, layers.palette = lab, pal
                want = (1.0 - alpha) * want + alpha * (pal[lab].astype(np.float32) / 255.0)
            want = (np.clip(want, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            got = _blend(img, layers, 5, 0, np.zeros(3, np.uint8), alpha)
            assert np.array_equal(got, want)


def test_compacted_manifest_is_the_strict_text_of_each_last_record(tmp_path: Path) -> None:
    """compact_manifest rewrites each key's last record as dumps_strict writes it (in the
    items' order), a NaN token from another writer nulled."""
    from zsdense.io.atomic import dumps_strict
    from zsdense.io.manifest import compact_manifest

    man = Manifest(tmp_path / "results.jsonl")
    nested = {
        "instances": [{"box": [1, 2, 3, 4], "area": 7, "mean": 0.123456789012345}],
        "name": "ünïcode é",
        "flags": [True, False, None],
    }
    man.append({**record_ok("b.png"), **nested})
    man.append({**record_ok("a.png"), "score": 1e-300})
    with open(man.path, "a", encoding="utf-8") as f:
        f.write(json.dumps({**record_ok("c.png"), "score": float("nan")}) + "\n")  # NaN token
    records = list(Manifest(man.path).records())
    assert compact_manifest(man.path, ["a.png", "b.png", "c.png"]) == 3
    lines = man.path.read_text(encoding="utf-8").splitlines()
    want = {record_key(r): dumps_strict(r) for r in records}
    assert lines == [want["a.png"], want["b.png"], want["c.png"]]
    assert json.loads(lines[2])["score"] is None
