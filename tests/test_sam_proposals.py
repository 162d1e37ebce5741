"""SAM proposals at decoder cost: the same masks, boxes, scores and order as
``segment_anything.SamAutomaticMaskGenerator`` (which re-encodes the image: allowed in tests
only), for several point grids, batch sizes and thresholds on the tiny SAM; the decoder's shared
image side gives bit-identical logits; the opt-in low-resolution stability mode.

What is exact and what is a tolerance: matrix products of the same shapes give the same bits on
one machine, products of other shapes need not (MKL / oneDNN choose blocking and the thread split
by shape, thread count and ISA). So the bit-identity tests compare runs that decode the same
prompt counts per call (the reference run with the ``points_per_batch`` whose calls match
:func:`~zsdense.models.sam_proposals.decoder_call_sizes`); runs that decode other counts (the
reference at the preset's ``points_per_batch``, one batch against 4-prompt chunks) are compared
with tolerances (measured values in the tests). ``ZSDENSE_TEST_THREADS=3`` makes the difference
visible on a CPU where 2 threads hide it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from zsdense.errors import ConfigError
from zsdense.models import sam_proposals as SP
from zsdense.models.sam import build_sam

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def sam():
    return build_sam("vit_b", tiny=True)


def _image(size_wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(ASSETS / "scenes" / "coffee.png").convert("RGB").resize(size_wh))


@pytest.fixture(scope="module")
def images(sam):
    """Two images (landscape, portrait) with their SAM states (encoded once each)."""
    out = {}
    for name, wh in (("landscape", (128, 96)), ("portrait", (72, 120))):
        img = _image(wh)
        out[name] = (img, sam.encode(img))
    return out


CASES = [
    # name, image, settings (offset < 1 gives the random tiny SAM non-trivial stability scores)
    (
        "2x2-open-min-area",
        "landscape",
        dict(
            points_per_side=2,
            points_per_batch=64,
            pred_iou_thresh=-1e9,
            stability_score_thresh=-1e9,
            stability_score_offset=1.0,
            box_nms_thresh=0.7,
            min_mask_region_area=200,
        ),
    ),
    (
        "4x4-iou-and-stability",
        "landscape",
        dict(
            points_per_side=4,
            points_per_batch=64,
            pred_iou_thresh=0.05,
            stability_score_thresh=0.5,
            stability_score_offset=0.02,
            box_nms_thresh=0.9,
            min_mask_region_area=0,
        ),
    ),
    (
        "5x5-zero-thresholds-odd-batches",
        "landscape",
        dict(
            points_per_side=5,
            points_per_batch=7,
            pred_iou_thresh=0.0,  # the reference skips a filter whose threshold is not > 0
            stability_score_thresh=0.0,
            stability_score_offset=0.05,
            box_nms_thresh=0.8,
            min_mask_region_area=100,
        ),
    ),
    (
        "6x6-batches-of-12-chunked",
        "portrait",
        dict(
            points_per_side=6,
            points_per_batch=12,  # three batches, each decoded 4 prompts at a time
            pred_iou_thresh=-1e9,
            stability_score_thresh=-1e9,
            stability_score_offset=0.05,
            box_nms_thresh=0.9,
            min_mask_region_area=50,
        ),
    ),
    (
        "3x3-portrait-low-nms",
        "portrait",
        dict(
            points_per_side=3,
            points_per_batch=4,
            pred_iou_thresh=0.09,
            stability_score_thresh=0.3,
            stability_score_offset=0.02,
            box_nms_thresh=0.5,  # the small-region NMS runs at max(0.5, crop_nms_thresh 0.7)
            min_mask_region_area=300,
        ),
    ),
]


def _call_sizes(n_points: int, per_batch: int, ours: bool) -> list[int]:
    """Prompt counts per decoder call: ours (batches split by ``decoder_call_sizes``) or the
    reference's (one call per ``points_per_batch`` batch)."""
    sizes = [min(per_batch, n_points - i) for i in range(0, n_points, per_batch)]
    return [c for b in sizes for c in SP.decoder_call_sizes(b)] if ours else sizes


def _matching_reference_batch(settings: dict) -> int:
    """The reference ``points_per_batch`` that decodes the same prompt counts per call as ours."""
    n = settings["points_per_side"] ** 2
    ours = _call_sizes(n, settings["points_per_batch"], ours=True)
    for pb in (settings["points_per_batch"], SP.DECODE_CHUNK):
        if _call_sizes(n, pb, ours=False) == ours:
            return pb
    raise AssertionError(f"no reference batching decodes the calls {ours}")


@pytest.mark.parametrize("name, image, settings", CASES, ids=[c[0] for c in CASES])
def test_equal_to_segment_anything_generator(sam, images, name, image, settings):
    """Exact against the reference decoding the same prompt counts per call; within the last
    bits of the logits against the reference at the case's own ``points_per_batch``."""
    from segment_anything import SamAutomaticMaskGenerator

    img, state = images[image]
    ours = SP.sam_proposals(sam, state, SP.ProposalSettings(**settings))
    same_calls = dict(settings, points_per_batch=_matching_reference_batch(settings))
    anns = SamAutomaticMaskGenerator(sam.model, **same_calls).generate(img)
    assert len(anns) >= 1 and not ours.fallback
    assert ours.masks.shape[0] == len(anns)
    for i, a in enumerate(anns):  # same order, masks, boxes and scores, exactly
        assert ours.masks[i].numpy().tobytes() == a["segmentation"].tobytes(), i
        assert [int(v) for v in ours.boxes_xywh[i]] == [int(v) for v in a["bbox"]], i
        assert float(ours.iou_preds[i]) == a["predicted_iou"], i
        assert float(ours.stability[i]) == a["stability_score"], i
    if same_calls["points_per_batch"] == settings["points_per_batch"]:
        return
    # The reference at the case's points_per_batch multiplies other shapes: its logits may
    # differ in the last bits (measured max |Δ IoU| 3e-8, masks and stability equal, with 3 and
    # 5 threads on an AVX-512 CPU). A mask pixel flips only where a logit is that close to the
    # threshold: allowed for 0.1 % of the pixels.
    other = SamAutomaticMaskGenerator(sam.model, **settings).generate(img)
    assert len(other) == ours.masks.shape[0]
    h, w = ours.masks.shape[1:]
    for i, a in enumerate(other):
        assert int((ours.masks[i].numpy() != a["segmentation"]).sum()) <= 1e-3 * h * w, i
        assert np.abs(ours.boxes_xywh[i].numpy() - np.asarray(a["bbox"])).max() <= 1, i
        assert abs(float(ours.iou_preds[i]) - a["predicted_iou"]) <= 1e-5, i
        assert abs(float(ours.stability[i]) - a["stability_score"]) <= 1e-3, i


def test_filters_that_remove_everything_give_the_flagged_whole_image(sam, images):
    from segment_anything import SamAutomaticMaskGenerator

    img, state = images["landscape"]
    settings = dict(points_per_side=2, pred_iou_thresh=5.0)
    assert SamAutomaticMaskGenerator(sam.model, **settings).generate(img) == []
    p = SP.sam_proposals(sam, state, None, **settings)
    assert p.fallback and p.masks.shape == (1, 96, 128) and bool(p.masks.all())
    assert p.boxes_xywh.tolist() == [[0, 0, 127, 95]]


def test_decoder_with_shared_image_side_is_bit_identical(sam):
    """Mixed positive / negative two-point prompts on a random embedding. (Identity holds at
    the same batch size: the reference's own last bits depend on ``points_per_batch``. One
    product differs in shape: the image side is projected once, 4096 rows, where the reference
    projects B × 4096; a row's bits do not depend on the row count unless the BLAS splits the
    inner dimension (256): matched at batch sizes 1-64, 1-8 threads and ATEN_CPU_CAPABILITY
    avx512 / avx2 / default.)"""
    m = sam.model
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    coords = (torch.rand(6, 2, 2, generator=g) * 1000).double()
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.int)
    with torch.no_grad():
        sparse, dense = m.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ref_low, ref_iou = m.mask_decoder(
            image_embeddings=emb,
            image_pe=m.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        side = SP.decoder_image_side(m, emb)
        low, iou = SP.decode_points(m, side, coords, labels)
    assert low.shape == ref_low.shape == (6, 3, 256, 256)
    assert torch.equal(low, ref_low) and torch.equal(iou, ref_iou)


@pytest.mark.parametrize("batch", [8, 16, 64])
def test_chunked_decoding_equals_the_reference_decoding_the_same_chunks(sam, batch):
    """``decode_in_chunks`` (``DECODE_CHUNK`` prompts at a time on the CPU) gives the bits of
    the reference decoder run on the same chunks (same shapes), and the whole
    ``points_per_batch`` batch decoded at once up to the last bits (other shapes)."""
    m = sam.model
    g = torch.Generator().manual_seed(batch)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    coords = (torch.rand(batch, 1, 2, generator=g) * 1000).double()
    labels = torch.ones(batch, 1, dtype=torch.int)
    side = SP.decoder_image_side(m, emb)
    chunked = SP.decode_in_chunks(m, side, coords, labels)
    sizes = SP.decoder_call_sizes(batch)
    assert len(sizes) == batch // SP.DECODE_CHUNK and set(sizes) == {SP.DECODE_CHUNK}
    ref_low, ref_iou = [], []
    with torch.no_grad():
        for i in range(0, batch, SP.DECODE_CHUNK):
            c, lab = coords[i : i + SP.DECODE_CHUNK], labels[i : i + SP.DECODE_CHUNK]
            sparse, dense = m.prompt_encoder(points=(c, lab), boxes=None, masks=None)
            low, iou = m.mask_decoder(
                image_embeddings=emb,
                image_pe=m.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            ref_low.append(low)
            ref_iou.append(iou)
    assert torch.equal(chunked[0], torch.cat(ref_low))
    assert torch.equal(chunked[1], torch.cat(ref_iou))
    # one call for the whole batch: other GEMM shapes; measured max |Δ logit| 5.2e-8 (3 threads,
    # AVX-512 CPU; 0 with 1, 2, 4 or 8 threads), IoUs equal
    whole = SP.decode_points(m, side, coords, labels)
    torch.testing.assert_close(whole[0], chunked[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(whole[1], chunked[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "input_size, original_size",
    [
        ((768, 1024), (480, 640)),
        ((1024, 683), (600, 400)),
        ((1024, 1024), (50, 50)),
        ((60, 1024), (6, 100)),
    ],
)
def test_cropped_upsampling_equals_postprocess_masks(sam, input_size, original_size):
    low = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    ref = sam.model.postprocess_masks(low, input_size, original_size)
    assert torch.equal(SP.upsample_logits(sam.model, low, input_size, original_size), ref)


# a 4×4 grid with the IoU filter opened, every mask kept through NMS and no region cleaning;
# offset 0.02 gives the random tiny SAM's noise logits non-trivial stability scores
OPEN_4X4 = dict(
    points_per_side=4,
    pred_iou_thresh=-1e9,
    stability_score_offset=0.02,
    box_nms_thresh=1.0,
    min_mask_region_area=0,
)


def test_lowres_stability_mode(sam, images):
    """Opt-in: stability from the 256² logits (cropped to the image). Without a stability
    filter the masks are the reference's and only the scores differ; with one, the masks kept
    are exactly those whose low-resolution score passes. (Random tiny SAM logits are noise at
    pixel scale, so the scores here differ far more than on trained weights.)"""
    _, state = images["landscape"]
    base = OPEN_4X4
    exact = SP.sam_proposals(sam, state, None, stability_score_thresh=-1e9, **base)
    fast = SP.sam_proposals(
        sam, state, None, stability_score_thresh=-1e9, stability="lowres", **base
    )
    assert torch.equal(exact.masks, fast.masks) and torch.equal(exact.iou_preds, fast.iou_preds)
    assert not torch.equal(exact.stability, fast.stability)
    assert bool(((fast.stability >= 0) & (fast.stability <= 1)).all())
    thr = float(fast.stability.median())
    kept = SP.sam_proposals(
        sam, state, None, stability_score_thresh=thr, stability="lowres", **base
    )
    expected = {m.numpy().tobytes() for m, st in zip(fast.masks, fast.stability) if st >= thr}
    assert 0 < kept.masks.shape[0] < fast.masks.shape[0]
    assert {m.numpy().tobytes() for m in kept.masks} == expected
    with pytest.raises(ConfigError, match="unknown stability mode"):
        SP.sam_proposals(sam, state, None, stability="fast")
    with pytest.raises(ConfigError, match="unknown proposal setting"):
        SP.sam_proposals(sam, state, None, points_per_bach=4)


def test_proposal_decoder_modes_in_float32(sam, images):
    """``decoder``: "auto" and "reference" are the exact path (the same bits); "arranged" (opt-in
    in float32) runs the arranged decoder on a float32 copy, cached: the same model, so the
    same masks up to pixels at the threshold, IoUs and stability to float rounding."""
    from zsdense.models.sam_decoder_reduced import ReducedDecoderSam

    _, state = images["landscape"]
    base = dict(OPEN_4X4, stability_score_thresh=-1e9)
    auto = SP.sam_proposals(sam, state, None, **base)
    ref = SP.sam_proposals(sam, state, None, decoder="reference", **base)
    assert torch.equal(auto.masks, ref.masks) and torch.equal(auto.iou_preds, ref.iou_preds)
    arr = SP.sam_proposals(sam, state, None, decoder="arranged", **base)
    red = SP.decoder_for(sam, arranged=True)
    assert isinstance(red, ReducedDecoderSam) and red.dtype == torch.float32
    assert SP.decoder_for(sam, arranged=True) is red and SP.decoder_for(sam) is sam.model
    assert arr.masks.shape == auto.masks.shape  # every mask kept: the order is the grid's
    assert torch.allclose(arr.iou_preds, auto.iou_preds, rtol=0, atol=1e-5)
    assert torch.allclose(arr.stability, auto.stability, rtol=0, atol=0.02)
    agree = (arr.masks == auto.masks).flatten(1).float().mean(dim=1)
    assert float(agree.min()) > 0.99
    with pytest.raises(ConfigError, match="unknown proposal decoder"):
        SP.sam_proposals(sam, state, None, decoder="fast")


def test_referring_uses_the_moved_proposals(sam, images):
    from zsdense.tasks import hybridgl as R

    assert R.sam_proposals is SP.sam_proposals and R.Proposals is SP.Proposals
    _, state = images["portrait"]
    a = sam.proposals(state, None, points_per_side=2, pred_iou_thresh=-1e9)
    b = SP.sam_proposals(sam, state, SP.ProposalSettings(points_per_side=2, pred_iou_thresh=-1e9))
    assert torch.equal(a.masks, b.masks) and torch.equal(a.iou_preds, b.iou_preds)


def test_pooling_and_chunk_sizes_do_not_change_results(sam, images, monkeypatch):
    """Survivors are upsampled in pooled flushes and chunks; their sizes bound memory only."""
    _, state = images["landscape"]
    settings = SP.ProposalSettings(**CASES[2][2])  # 5x5 grid, batches of 7, min-area cleaning
    ref = SP.sam_proposals(sam, state, settings)
    monkeypatch.setattr(SP, "FLUSH_MASKS", 5)
    monkeypatch.setattr(SP, "UPSAMPLE_CHUNK", 4)
    small = SP.sam_proposals(sam, state, settings)
    assert torch.equal(ref.masks, small.masks) and torch.equal(ref.boxes_xywh, small.boxes_xywh)
    assert torch.equal(ref.iou_preds, small.iou_preds)
    assert torch.equal(ref.stability, small.stability)
