"""AnomalyDINO's own outputs on a tiny random DINOv2 (../shared/fixtures/anomalydino) vs zsdense.

Every size, grid, angle, threshold, σ, case name, setting and the few-shot draw (shots, seed:
which references a case uses, and the bank's source numbering by position in the given list)
is read from the fixture files; :func:`test_sizes_follow_a_modified_fixture` checks the draw
and the bank provenance on draws with other seeds.
Tolerances (fixtures README §7): preprocessing, rotations, masks, memory order and kNN index
sets exact; features 5e-5; first-PC scores 2e-4; cosine distances, maps and scores 2e-6; raw
kNN squared distances 8e-6; the ``L2`` metric case 2e-4 (raw squared distances relative 1e-5).
Each case runs twice: from the stored reference features (the head alone) and end to end from
the raw uint8 images through our preprocessing, rotation and DINOv2 path.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from zsdense.models.dinov2 import dinov2_from_hub_state_dict
from zsdense.tasks import fewshot as fs

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "anomalydino"

TOL_FEAT = 5e-5
TOL_PC = 2e-4
TOL_COS = 2e-6
TOL_RAW_D = 8e-6
TOL_L2 = 2e-4
RTOL_L2_RAW = 1e-5


def _case_names() -> list[str]:
    p = FIXTURE / "cases.pt"
    if not p.is_file():
        return ["<fixtures absent>"]
    return list(torch.load(p, weights_only=True)["config"]["case_names"])


def _load(name: str):
    p = FIXTURE / name
    if not p.is_file():
        pytest.skip(f"AnomalyDINO fixture {p} not found")
    return torch.load(p, weights_only=True)


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def model_fx():
    return _load("model.pt")


@pytest.fixture(scope="module")
def inputs():
    return _load("inputs.pt")


@pytest.fixture(scope="module")
def feats():
    return _load("features.pt")


@pytest.fixture(scope="module")
def cases():
    return _load("cases.pt")


@pytest.fixture(scope="module")
def dino(model_fx):
    c = model_fx["config"]
    return dinov2_from_hub_state_dict(
        model_fx["state_dict"],
        name="fixture-" + c["model_name"],
        img_size=int(c["native_img_size"]),
        patch_size=int(c["patch_size"]),
        num_heads=int(c["num_heads"]),
        mlp_ratio=float(c["mlp_ratio"]),
        layer_norm_eps=float(c["layer_norm_eps"]),
        interpolate_offset=float(c["interpolate_offset"]),
        interpolate_antialias=bool(c["interpolate_antialias"]),
        is_random=True,
    )


@pytest.fixture(scope="module")
def cfg(inputs):
    return inputs["config"]


@pytest.fixture(scope="module")
def e2e(dino, inputs, cfg):
    """Our features from the raw uint8 images: refs (R, A) lists and tests, with grids."""
    angles = [int(a) for a in cfg["rot_angles"]]
    s = int(cfg["smaller_edge_size"])
    refs = []
    for img in inputs["ref_images"]:
        rotated = [fs.rotate_image(_u8(img), a) for a in angles]
        refs.append(fs.extract_features(dino, rotated, s, "auto"))
    tests = fs.extract_features(dino, [_u8(t) for t in inputs["test_images"]], s, "auto")
    return {"refs": refs, "tests": tests}


# ---- model, preprocessing, rotation ------------------------------------------------------------


def test_fixture_model_loads_into_transformers_layout(dino, model_fx):
    c = model_fx["config"]
    assert dino.width == int(c["embed_dim"])
    assert len(dino.model.encoder.layer) == int(c["depth"])
    assert dino.num_registers == int(c["num_register_tokens"])
    assert dino.pos_interp == "hub"


def test_preprocess_checks_exact(inputs):
    for chk in inputs["preprocess_checks"]:
        img = _u8(chk["image"])
        s = int(chk["smaller_edge_size"])
        resized = fs.resize_smaller_edge(img, s)
        assert list(resized.shape[:2]) == list(chk["resized_hw"])
        np.testing.assert_array_equal(resized, _u8(chk["resized_uint8"]))
        x, grid = fs.prepare_image(img, s)
        assert list(grid) == list(chk["grid"])
        assert torch.equal(x, chk["tensor"])


def test_prepared_tensors_exact(inputs, cfg):
    s = int(cfg["smaller_edge_size"])
    for p in inputs["prepared"]:
        src = inputs["test_images"] if p["which"] == "test" else inputs["ref_images"]
        img = fs.rotate_image(_u8(src[int(p["index"])]), int(p["angle"]))
        x, grid = fs.prepare_image(img, s)
        assert list(x.shape[1:]) == list(cfg["cropped_hw"])
        assert list(grid) == list(cfg["grid"])
        assert torch.equal(x, p["tensor"])


def test_rotations_match_reference(inputs, cfg):
    ref = _u8(inputs["ref_images"][int(inputs["rotated_ref"]["ref_index"])])
    for a, angle in enumerate(cfg["rot_angles"]):
        ours = fs.rotate_image(ref, int(angle)).astype(int)
        theirs = _u8(inputs["rotated_ref"]["images"][a]).astype(int)
        # exact with the reference's OpenCV; ±1 level allowed for another OpenCV build (F9)
        assert np.abs(ours - theirs).max() <= 1, f"angle {angle}"
        if int(angle) == 0:
            np.testing.assert_array_equal(ours, ref)


# ---- features and masks ------------------------------------------------------------------------


def test_features_end_to_end(e2e, feats):
    for r, per_angle in enumerate(e2e["refs"]):
        for a, (f, grid) in enumerate(per_angle):
            assert f.shape == feats["ref_features"][r, a].shape
            assert list(grid) == list(feats["config"]["grid"])
            assert (f - feats["ref_features"][r, a]).abs().max().item() < TOL_FEAT, (r, a)
    for i, (f, _) in enumerate(e2e["tests"]):
        assert (f - feats["test_features"][i]).abs().max().item() < TOL_FEAT


def test_transformers_resize_is_not_the_reference(dino, inputs, feats, cfg):
    """The trap: transformers' own pos-embed resize is far off (README F1: 0.70)."""
    angles = [int(a) for a in cfg["rot_angles"]]
    p = inputs["prepared"][0]
    i, a = int(p["index"]), angles.index(int(p["angle"]))
    ref = feats["test_features"][i] if p["which"] == "test" else feats["ref_features"][i, a]
    t = dino.tokens(p["tensor"][None], pos_interp="transformers")[0, 1 + dino.num_registers :]
    assert (t - ref).abs().max().item() > 100 * TOL_FEAT


def test_first_pc_and_masks(feats, cfg):
    grid = tuple(feats["config"]["grid"])
    thr = float(cfg["threshold"])
    for f, pc, m in zip(feats["test_features"], feats["test_first_pc"], feats["test_masks"]):
        assert np.abs(fs.first_pc_scores(f) - pc.numpy()).max() < TOL_PC
        np.testing.assert_array_equal(fs.foreground_mask(f, grid, thr), m.numpy().astype(bool))
    r, a = feats["ref_features"].shape[:2]
    for i in range(r):
        for j in range(a):
            f = feats["ref_features"][i, j]
            assert np.abs(fs.first_pc_scores(f) - feats["ref_first_pc"][i, j].numpy()).max() < (
                TOL_PC
            )
            got = fs.foreground_mask(f, grid, thr)
            np.testing.assert_array_equal(got, feats["ref_masks"][i, j].numpy().astype(bool))


def test_morph_is_one_dimensional_and_wraps():
    # a 3x4 grid, one kept patch at the end of row 0 (flat index 3): dilation keeps 2..4 and
    # index 4 is row 1, column 0 (the wrap); closing keeps the run; a 2-D op would differ
    m = np.zeros(12, dtype=bool)
    m[3] = True
    got = fs.morph_1d(m)
    assert np.nonzero(got)[0].tolist() == [2, 3, 4]
    # a one-patch hole in a run is filled by the closing, the ends do not erode
    m = np.zeros(12, dtype=bool)
    m[[0, 1, 3, 4]] = True
    assert np.nonzero(fs.morph_1d(m))[0].tolist() == [0, 1, 2, 3, 4, 5]


# ---- cases --------------------------------------------------------------------------------------


def _options(case, cfg) -> fs.FewShotOptions:
    st = case["settings"]
    return fs.FewShotOptions(
        model="fixture",
        image_size=int(cfg["smaller_edge_size"]),
        masking=bool(st["masking"]),
        rotation=bool(st["rotation"]),
        rot_angles=tuple(int(a) for a in cfg["rot_angles"]),
        mask_ref_images=bool(st["mask_ref_images"]),
        knn_neighbors=int(st["knn_neighbors"]),
        knn_metric=str(st["knn_metric"]),
        sigma=float(cfg["sigma"]),
        mask_threshold=float(cfg["threshold"]),
    ).validate()


def _check_case(bank, scored, case, name, src):
    l2 = case["settings"]["knn_metric"] == "L2"
    tol = TOL_L2 if l2 else TOL_COS
    assert bank.n_rows == int(case["memory_bank_size"])
    np.testing.assert_array_equal(
        bank.all_source().numpy(), case["memory_bank_source"].numpy().astype(np.int32)
    )
    for r, t in zip(scored, case["tests"]):
        where = f"{name} [{src}] {t['id']}"
        kept = t["mask"].numpy().astype(bool)
        np.testing.assert_array_equal(r.mask, kept, err_msg=where)
        assert int(r.mask.sum()) == int(t["n_kept"])
        ref_i = t["knn_I"][torch.from_numpy(kept)].long()
        ref_d = t["knn_D"][torch.from_numpy(kept)]
        assert torch.equal(r.knn_i, ref_i), where
        if l2:
            assert ((r.knn_d - ref_d).abs() <= RTOL_L2_RAW * ref_d.abs() + TOL_L2).all(), where
        else:
            assert (r.knn_d - ref_d).abs().max().item() < TOL_RAW_D, where
        assert np.abs(r.patch_dist - t["patch_dist"].numpy()).max() < tol, where
        assert list(r.grid) == list(t["patch_dist_grid"].shape)
        assert np.abs(r.map_resized - t["map_resized"].numpy()).max() < tol, where
        assert r.anomaly_map.shape == tuple(t["map_smoothed"].shape)
        assert np.abs(r.anomaly_map - t["map_smoothed"].numpy()).max() < tol, where
        assert abs(r.score - float(t["score"])) < tol, where


def check_draw(case, inputs) -> list[int]:
    """The case's references are the reference's few-shot draw (``n_shot``, ``seed``) from
    the given list; returns their positions in it."""
    st = case["settings"]
    n_given = len(inputs["ref_images"])
    positions = fs.reference_positions(n_given, int(st["n_shot"]), int(st["seed"]))
    assert positions == [int(i) for i in case["ref_indices_used"]]
    files = list(inputs["ref_files"])
    assert fs.select_references(files, int(st["n_shot"]), int(st["seed"])) == list(
        case["ref_files_used"]
    )
    return positions


@pytest.mark.parametrize("source", ["stored", "e2e"])
@pytest.mark.parametrize("name", _case_names())
def test_case(name, source, cases, feats, inputs, cfg, e2e):
    case = cases["cases"][name]
    opts = _options(case, cfg)
    refs_used = check_draw(case, inputs)
    n_aug = int(case["n_augment"])
    assert len(opts.angles()) == n_aug
    grid = tuple(int(g) for g in feats["config"]["grid"])
    if source == "stored":
        per_ref = [[(feats["ref_features"][r, a], grid) for a in range(n_aug)] for r in refs_used]
        tests = [(f, grid) for f in feats["test_features"]]
    else:
        per_ref = [e2e["refs"][r][:n_aug] for r in refs_used]
        tests = e2e["tests"]
    sizes = [tuple(inputs["ref_images"][r].shape[:2]) for r in refs_used]
    bank = fs.memory_from_features(per_ref, sizes, opts, settings={}, model={}, positions=refs_used)
    size = tuple(int(v) for v in cfg["image_hw"])
    scored = [
        fs.score_features(f, g, size, bank.features, opts, keep_unsmoothed=True) for f, g in tests
    ]
    _check_case(bank, scored, case, name, source)


def test_full_pipeline_one_case(dino, cases, inputs, cfg):
    """build_memory_with + score_images_with (the glue the Segmenter path runs) on the richest
    case: the most shots with rotation and masking."""
    cs = cases["cases"]
    name = max(
        cs,
        key=lambda n: (
            len(cs[n]["ref_indices_used"]),
            cs[n]["settings"]["rotation"],
            cs[n]["settings"]["masking"],
            cs[n]["settings"]["knn_metric"] == "L2_normalized",
        ),
    )
    case = cs[name]
    st = case["settings"]
    opts = replace(_options(case, cfg), shots=int(st["n_shot"]))
    given = [_u8(img) for img in inputs["ref_images"]]  # the draw happens in the library
    bank = fs.build_memory_with(dino, given, opts, list(inputs["ref_files"]), seed=int(st["seed"]))
    assert bank.names == list(case["ref_files_used"])
    scored = fs.score_images_with(
        dino, bank, [_u8(t) for t in inputs["test_images"]], opts, keep_unsmoothed=True
    )
    _check_case(bank, scored, case, name, "build_memory_with")


# ---- the draw and the bank's provenance follow the fixture ---------------------------------


def test_sizes_follow_a_modified_fixture(cases, feats, inputs, cfg):
    """Draws with other seeds, made consistently from a stored case: the block of ``seed`` with
    ``k`` shots inside a case's references is that case's bank restricted to those images (the
    bank is built image by image), and its rows keep the images' positions in the given list
    (the reference's numbering: the draw with seed S starts at S·k), not 0..k-1."""
    cs = cases["cases"]
    # a case whose memory holds every reference row (no reference masking)
    full = max(
        (
            c
            for c in cs.values()
            if not (c["settings"]["masking"] and c["settings"]["mask_ref_images"])
        ),
        key=lambda c: (len(c["ref_indices_used"]), c["settings"]["rotation"]),
    )
    opts = _options(full, cfg)
    used = check_draw(full, inputs)
    grid = tuple(int(g) for g in feats["config"]["grid"])
    n_aug = int(full["n_augment"])
    src = full["memory_bank_source"].long()
    n_given = len(inputs["ref_images"])
    draws = [
        (k, seed)
        for k in range(1, len(used) + 1)
        for seed in range(1, (n_given + k - 1) // k)
        if set(fs.reference_positions(n_given, k, seed)) <= set(used)
    ]
    assert draws, used
    for k, seed in draws:
        pos = fs.reference_positions(n_given, k, seed)
        assert pos[0] == seed * k  # the reference's block, numbered in the given list
        files = fs.select_references(list(inputs["ref_files"]), k, seed)
        assert files == [inputs["ref_files"][i] for i in pos]
        per_ref = [[(feats["ref_features"][r, a], grid) for a in range(n_aug)] for r in pos]
        sizes = [tuple(inputs["ref_images"][r].shape[:2]) for r in pos]
        bank = fs.memory_from_features(per_ref, sizes, opts, settings={}, model={}, positions=pos)
        want = src[torch.isin(src[:, 0], torch.tensor(pos))]
        assert bank.n_rows == want.shape[0] > 0
        assert torch.equal(bank.all_source().long(), want), (k, seed)
        # numbering the rows 0..k-1 (within the shots) would not be the reference's
        shots_only = fs.memory_from_features(per_ref, sizes, opts, settings={}, model={})
        assert not torch.equal(shots_only.all_source().long(), want)
