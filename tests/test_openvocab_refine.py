"""Trident SAM refinement on synthetic probability maps (hand-computed prompts)."""

from __future__ import annotations

import torch

from zsdense.tasks import openvocab as ov

H, W = 100, 120  # half resolution 50 x 60


def _scene():
    """3 classes: background 0.5 everywhere; class 1 two 40x40 blobs (0.9, one 2x2 peak of
    0.99); class 2 one 20x20 blob (100 px at half resolution < 225: no prompt)."""
    p = torch.zeros(3, H, W)
    p[0] = 0.5
    p[1, 10:50, 10:50] = 0.9
    p[1, 30:32, 20:22] = 0.99  # peak -> half-res (15, 10): point (x=10, y=15)
    p[1, 60:100, 70:110] = 0.9
    p[1, 80:82, 100:102] = 0.95  # peak -> half-res (40, 50)
    p[2, 70:90, 10:30] = 0.8
    labels = p.argmax(0)
    return p, labels


def test_two_blobs_give_two_prompt_sets_and_small_blob_is_dropped():
    p, labels = _scene()
    ph, lh = ov.half_res_inputs(p, labels, coarse_thresh=0.3)
    assert ph.shape == (3, 50, 60) and lh.shape == (50, 60)
    prompts = ov.component_prompts(ph, lh, coarse_thresh=0.3, min_area=225)
    by_cls = {cp.cls: cp for cp in prompts}
    assert 2 not in by_cls  # 10 x 10 = 100 px < 225
    c1 = by_cls[1]
    assert c1.masks.shape == (2, 50, 60)
    assert c1.masks.sum((1, 2)).tolist() == [400, 400]
    assert c1.boxes_xyxy.tolist() == [[5, 5, 24, 24], [35, 30, 54, 49]]  # inclusive max
    assert c1.points_xy.tolist() == [[10, 15], [50, 40]]  # (x, y) of the peaks
    # with a lower area threshold the small blob gets its own prompt
    prompts = ov.component_prompts(ph, lh, coarse_thresh=0.3, min_area=100)
    assert {cp.cls for cp in prompts} == {0, 1, 2}
    # 8-connectivity: two diagonal touching squares are one component
    lab = torch.zeros(50, 60, dtype=torch.long)
    lab[0:20, 0:20] = 1
    lab[20:40, 20:40] = 1
    one = ov.component_prompts(torch.ones(2, 50, 60) * 0.5, lab, 0.0, 225)
    assert [cp.masks.shape[0] for cp in one if cp.cls == 1] == [1]


def test_refine_calls_sam_once_per_class_and_filters_iou():
    p, labels = _scene()
    calls = []

    def stub(point_coords, point_labels, boxes, mask_input):
        k = boxes.shape[0]
        calls.append((point_coords.clone(), boxes.clone(), tuple(mask_input.shape)))
        low = torch.full((k, 1, 256, 256), -5.0)
        iou = torch.full((k, 1), 0.5)  # fails
        if k == 2:  # class 1: first prompt set kept (mask everywhere), second fails
            low[0] = 5.0
            iou[0] = 0.95
        return low, iou

    out = ov.sam_refine(
        p,
        labels,
        stub,
        input_size=(853, 1024),
        sam_original_size=(H, W),
        coarse_thresh=0.3,
        min_area=225,
        iou_thresh=0.8,
        mask_coef=0.005,
        reference_prompts=True,
    )
    assert len(calls) == 2  # background and class 1; class 2 has no component
    pc, bx, mshape = calls[1]
    assert mshape == (1, 256, 256)  # Trident's 3-D dense prompt
    # prompts mapped to SAM's 1024 frame from the half-res size (50, 60): x * 1024/60,
    # y * 853/50 (ResizeLongestSide of (50, 60) = (853, 1024))
    sx, sy = 1024 / 60, 853 / 50
    assert torch.allclose(pc[:, 0], torch.tensor([[10 * sx, 15 * sy], [50 * sx, 40 * sy]]))
    assert torch.allclose(bx[0], torch.tensor([5 * sx, 5 * sy, 24 * sx, 24 * sy]))
    # only class 1 has a kept mask (covering everything): label 1 wherever P_1 > 0; where every
    # score is 0 the coarse label stays (background, and class 2's small blob)
    assert torch.equal(out.labels, torch.where(p[1] > 0, torch.ones_like(labels), labels))
    assert int((out.labels == 2).sum()) == 400
    assert out.kept_boxes_xyxy.tolist() == [[10, 10, 48, 48]]
    s = torch.sigmoid(torch.tensor(5.0))
    want = p[1] * s
    want[60:100, 70:110] = p[1, 60:100, 70:110]  # failed 2nd blob: coarse P in the returned map
    assert torch.allclose(out.probs[1], want, atol=1e-6)
    # background's failed component keeps its coarse probability in the returned map
    assert torch.allclose(out.probs[0, 0, 0], p[0, 0, 0])


def test_refine_fixed_prompts_use_sam_frame_and_4d_dense_prompt():
    p, labels = _scene()
    seen = []

    def stub(point_coords, point_labels, boxes, mask_input):
        seen.append((point_coords, boxes, tuple(mask_input.shape)))
        return torch.full((boxes.shape[0], 1, 256, 256), -1.0), torch.ones(boxes.shape[0], 1)

    out = ov.sam_refine(
        p,
        labels,
        stub,
        input_size=(853, 1024),
        sam_original_size=(H, W),
        coarse_thresh=0.3,
        reference_prompts=False,
    )
    pc, bx, mshape = seen[1]
    assert mshape == (2, 1, 256, 256)
    s = 1024 / 120  # half-res coords x2 to the original frame, then ResizeLongestSide
    assert torch.allclose(pc[0, 0], torch.tensor([20 * s, 30 * 853 / 100]))
    # no mask positive anywhere: every score 0 -> coarse labels stay
    assert torch.equal(out.labels, labels)


def test_dense_prompt_shape_and_threshold():
    ph = torch.zeros(50, 60)
    ph[10:20, 10:20] = 0.8
    ph[30:40, 30:40] = 0.2
    m = ov.dense_prompt(ph, (100, 120), coarse_thresh=0.3, coef=0.005)
    assert m.shape == (256, 256)
    assert torch.all(m[213:] == 0)  # padded bottom: preprocess shape (213, 256)
    assert float(m.max()) <= 0.8 * 0.005 + 1e-9 and float(m.max()) > 0
    assert float(m[150:170, 150:170].abs().max()) == 0.0  # the 0.2 blob is under the threshold
