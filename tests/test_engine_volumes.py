"""Medical sets through the engine: NIfTI slices + volume maps, DICOM frames, TIFF stacks."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from engine_dummy import spec as dummy_spec

from zsdense.api import Segmenter
from zsdense.engine.local import items_from_data, load_records, run_batch
from zsdense.engine.volumes import volume_from_slices


@pytest.fixture()
def seg():
    return Segmenter(device="cpu", models="tiny", precision="fp32", batch_size=4)


def test_nifti_slices_and_volume_map_written_back_with_affine(tmp_path, seg):
    nib = pytest.importorskip("nibabel")
    rng = np.random.RandomState(0)
    vol = rng.rand(6, 5, 4).astype(np.float32) * 100.0  # (X, Y, Z): 4 axial slices of 6x5
    affine = np.array([[0.8, 0, 0, -10], [0, 0.7, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    (tmp_path / "d").mkdir()
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "d" / "scan.nii.gz")
    items = items_from_data([tmp_path / "d"])
    out = tmp_path / "out"
    s = run_batch(
        seg,
        items,
        out,
        [dummy_spec(name="d", fmt="npy")],
        batch_size=3,
        progress=False,
        volume_maps=True,
    )
    assert (s.ok, s.failed) == (4, 0)
    recs = load_records(out)
    assert [r["key"] for r in recs] == [f"scan.nii.gz.s00{k}" for k in range(4)]
    assert all(r["item_records"] == 4 for r in recs)
    assert recs[2]["outputs"]["map"] == "scan.s002.map.npy"
    assert recs[2]["meta"]["image"]["slice"] == 2
    written = out / "scan.map.nii.gz"
    assert written in s.extra_outputs
    img = nib.load(written)
    np.testing.assert_allclose(img.affine, affine)
    got = np.asarray(img.dataobj, dtype=np.float32)
    assert got.shape == vol.shape
    # the dummy head's map is |v - mean(slice)| on volume-min/max normalised intensities,
    # a per-voxel quantity: the written-back volume must match it voxel for voxel
    norm = (vol - vol.min()) / (vol.max() - vol.min())
    expect = np.abs(norm - norm.mean(axis=(0, 1), keepdims=True))
    np.testing.assert_allclose(got, expect, atol=1e-5)
    # deterministic bytes (fixed gzip timestamp): a rerun with --force rewrites the same file
    before = written.read_bytes()
    assert gzip.decompress(before)[:4] == (348).to_bytes(4, "little")
    run_batch(
        seg,
        items,
        out,
        [dummy_spec(name="d", fmt="npy")],
        force=True,
        progress=False,
        volume_maps=True,
    )
    assert written.read_bytes() == before


def test_volume_from_slices_handles_class_maps():
    m = {k: np.full((2, 4, 3), k, np.float32) for k in range(5)}  # (K=2, H=4, W=3) per slice
    vol = volume_from_slices(m, (3, 4, 5), axis=2)
    assert vol.shape == (3, 4, 5, 2)
    assert float(vol[..., 3, 1].mean()) == 3.0


def test_dicom_frames_one_record_each_with_metadata(tmp_path, seg):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")
    if src is None:
        pytest.skip("pydicom test data not available")
    ds = pydicom.dcmread(src)
    frames = np.stack([ds.pixel_array + i for i in range(3)]).astype(ds.pixel_array.dtype)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    (tmp_path / "series").mkdir()
    ds.save_as(tmp_path / "series" / "multi.dcm")
    pydicom.dcmread(src).save_as(tmp_path / "series" / "single.dcm")
    items = items_from_data([tmp_path / "series"])
    s = run_batch(seg, items, tmp_path / "out", [dummy_spec(name="d")], progress=False)
    assert s.ok == 4, s.errors
    recs = {r["key"]: r for r in load_records(tmp_path / "out")}
    assert set(recs) == {"multi.dcm.f000", "multi.dcm.f001", "multi.dcm.f002", "single.dcm"}
    meta = recs["multi.dcm.f001"]["meta"]["image"]
    assert meta["frame"] == 1 and meta["Modality"] == "CT" and meta["frames_in_file"] == 3
    assert "PixelSpacing" in meta
    assert (tmp_path / "out" / "multi.f002.mask.png").is_file()


def test_16bit_tiff_stack_pages_become_images(tmp_path, seg):
    tifffile = pytest.importorskip("tifffile")
    pages = np.stack([np.full((8, 10), 1000 * (i + 1), np.uint16) for i in range(3)])
    pages[1, 0, 0] = 65535
    (tmp_path / "d").mkdir()
    with tifffile.TiffWriter(tmp_path / "d" / "stack.tif") as tw:  # 3 pages
        for page in pages:
            tw.write(page, photometric="minisblack")
    seen = []
    sp = dummy_spec(name="d")

    def run(ctxs, params):
        seen.extend(float(c.image[1, 1, 0]) for c in ctxs)
        return sp.run(ctxs, params)

    from zsdense.engine.specs import TaskSpec

    items = items_from_data([tmp_path / "d"])
    s = run_batch(seg, items, tmp_path / "out", [TaskSpec("d", run, sp.write)], progress=False)
    assert s.ok == 3
    recs = load_records(tmp_path / "out")
    assert [r["key"] for r in recs] == ["stack.tif.p000", "stack.tif.p001", "stack.tif.p002"]
    np.testing.assert_allclose(seen, [1000 / 65535, 2000 / 65535, 3000 / 65535], rtol=1e-6)
    assert recs[1]["meta"]["image"]["page"] == 1
    assert not any("only the first" in w for w in recs[0]["meta"]["image"]["warnings"])
    assert Path(tmp_path / "out" / "stack.p002.overlay.jpg").is_file()
