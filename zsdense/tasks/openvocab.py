"""Open-vocabulary segmentation head: Trident, ProxyCLIP and the CLIP-only presets.

Pipelines (``specs/openvocab.md``):

* ``trident``: Trident's resize rule → all 336-px windows in one batch → ProxyCLIP attention from
  DINOv2 features (mean(S) over all windows) → token canvas (splice) → SAM-guided global
  aggregation with SAM's last-block attention (SAM encoder once per image, shared through the
  :class:`~zsdense.context.ImageContext`) → ln_post/proj → cosine with the text classifier on
  SAM's token grid → bilinear to the image → optional SAM refinement with connected-component
  prompts (:func:`sam_refine`).
* ``proxyclip``, ``sclip``, ``clearclip``, ``naclip``: mmseg resize → windows (padded) →
  per-window dense features → per-window logits → logit canvas (segment-then-splice) → image.

Decision: ``P = softmax(logit_scale · cos)`` over queries, max over each class's synonyms,
``label = argmax``, ``max P < prob_thd → 0`` (background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zsdense.config import OpenVocabPreset
from zsdense.dense import aggregation as agg
from zsdense.dense import lastblock as lb
from zsdense.dense import windows as win
from zsdense.dense.methods import get_method
from zsdense.dense.upsample import pamr, upsample_scores
from zsdense.errors import ConfigError
from zsdense.io.instances import instance_masks, label_map_instances, to_supervision
from zsdense.io.writers import write_outputs
from zsdense.options import OpenVocabOptions, OutputOptions
from zsdense.text.classifier import TextClassifier, build_classifier

# ---------------------------------------------------------------------------------------------
# results


@dataclass
class OpenVocabResult:
    """Label map and per-class probabilities at the original image size."""

    labels: np.ndarray  # (H, W) int64 class index
    probs: np.ndarray  # (K, H, W) float32
    class_names: list[str]
    meta: dict = field(default_factory=dict)

    def areas(self) -> dict[str, float]:
        """Pixel fraction of every class present in ``labels``."""
        counts = np.bincount(self.labels.reshape(-1), minlength=len(self.class_names))
        total = max(1, self.labels.size)
        return {self.class_names[i]: float(c) / total for i, c in enumerate(counts) if c > 0}

    def write(
        self, stem, image: np.ndarray, out: OutputOptions, params: dict | None = None
    ) -> dict:
        """Label PNG, probabilities (as the float map) and overlay with a legend next to
        ``stem``; the classes present and their areas (pixel fractions) for the manifest."""
        names = list(self.class_names)
        outputs = write_outputs(
            stem,
            image,
            fmt=out.fmt,
            overlay=out.overlay,
            labels=self.labels,
            float_map=self.probs,
            map_metadata={"class_names": names},
            class_names=names,
            random_weights=bool(self.meta.get("random_weights")),
        )
        areas = self.areas()
        scores = {
            "area": {k: round(v, 6) for k, v in areas.items()},
            "classes_present": sorted(areas, key=lambda k: -areas[k]),
        }
        meta = {k: v for k, v in self.meta.items() if k != "areas"}
        meta["class_names"] = names
        return {"outputs": outputs, "scores": scores, "meta": meta, "instances": self.instances}

    @property
    def instances(self) -> list[dict]:
        """Per class present, the connected components of its region with box, area and the
        max / mean of the class's probability (:func:`zsdense.io.instances.label_map_instances`)."""
        probs = self.probs if self.probs is not None and np.ndim(self.probs) == 3 else None
        return label_map_instances(self.labels, self.class_names, probs)

    def to_supervision(self):
        """The class regions as ``supervision.Detections`` (``class_id`` = class index,
        confidence = the mean probability over the region); needs
        ``pip install 'zsdense[supervision]'``."""
        insts = self.instances
        return to_supervision(
            insts,
            instance_masks(self.labels, insts),
            self.labels.shape,
            class_names=self.class_names,
            confidence_key="score_mean",
        )


# ---------------------------------------------------------------------------------------------
# sizes


def mmseg_resize_hw(hw: tuple[int, int], short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """mmseg ``Resize(scale=(max_long, short_side), keep_ratio=True)``: scale by
    ``min(max_long / long, short_side / short)``, sizes rounded half up."""
    h, w = int(hw[0]), int(hw[1])
    scale = min(max_long / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image_hwc: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) float [0,1] -> (1, 3, h, w) float tensor, bilinear like mmseg (cv2 on 8-bit)."""
    import cv2

    h, w = size_hw
    if tuple(image_hwc.shape[:2]) == (h, w):
        out = image_hwc.astype(np.float32)
    else:
        u8 = np.round(image_hwc * 255.0)
        if np.allclose(u8, image_hwc * 255.0, atol=1e-3):
            out = cv2.resize(u8.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
            out = out.astype(np.float32) / 255.0
        else:
            out = cv2.resize(image_hwc.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------------
# decision


# Pixels :func:`class_max` marks at once (its byte marks: classes × this many bytes)
CLASS_MAX_PIXELS = 1 << 20


def class_max(scores_khw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.max(dim=0)``: each pixel's largest class score and the *first* class holding it
    (the same values and indices), in vectorised passes.

    torch's indexed max over the first dimension runs a scalar loop on the CPU (13 ms for 21
    classes at 480×640 here; ``argmax`` 30 ms), its value-only ``amax`` a vectorised one. So:
    the maximum by ``amax``; each class marked (one byte) where it holds it, with the weight
    K−1−k (the first class weighs most); the first class = K−1 − the largest mark (``amax``
    again): 3.7–3.9 ms for the same 21 × 480 × 640 scores. The marks are made for
    ``CLASS_MAX_PIXELS`` pixels at a time. A NaN (torch's max propagates it, with its index),
    over 256 classes and other devices go to torch's own ``max``.
    """
    k = scores_khw.shape[0]
    if (
        scores_khw.device.type != "cpu"
        or not 2 <= k <= 256
        or not scores_khw.dtype.is_floating_point
        or not scores_khw.is_contiguous()
    ):
        return tuple(scores_khw.max(dim=0))
    mx = scores_khw.amax(dim=0)
    if bool(torch.isnan(mx).any()):
        return tuple(scores_khw.max(dim=0))
    flat, top = scores_khw.reshape(k, -1), mx.reshape(-1)
    labels = torch.empty(top.shape, dtype=torch.long)
    weight = torch.arange(k - 1, -1, -1, dtype=torch.uint8)[:, None]
    for p0 in range(0, top.numel(), CLASS_MAX_PIXELS):
        part = slice(p0, p0 + CLASS_MAX_PIXELS)
        marks = (flat[:, part] == top[part]).view(torch.uint8).mul_(weight)  # (k, pixels)
        torch.sub(k - 1, marks.amax(dim=0), out=labels[part])
    return mx, labels.view(mx.shape)


def coarse_decision(
    clf: TextClassifier, cos_qhw: torch.Tensor, logit_scale: float, prob_thd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (K, H, W), labels (H, W)) from cosine logits (Q, H, W)."""
    probs = clf.class_probs(cos_qhw.float(), logit_scale)
    mx, labels = class_max(probs)
    if prob_thd > 0:
        labels = torch.where(mx < prob_thd, torch.zeros_like(labels), labels)
    return probs, labels


# ---------------------------------------------------------------------------------------------
# Trident


def vfm_on_clip_windows(dino) -> Callable[[torch.Tensor], torch.Tensor]:
    """DINOv2 patch features of CLIP-normalised windows (un-normalised with CLIP's mean/std and
    re-normalised with ImageNet's, as the references do)."""
    from zsdense.models.clip import OPENAI_MEAN, OPENAI_STD

    def run(x_clip_bchw: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(OPENAI_MEAN, device=x_clip_bchw.device, dtype=x_clip_bchw.dtype)
        std = torch.tensor(OPENAI_STD, device=x_clip_bchw.device, dtype=x_clip_bchw.dtype)
        x01 = x_clip_bchw * std[:, None, None] + mean[:, None, None]
        return dino.patch_features(dino.normalize(x01).to(dino.device))

    return run


def trident_window_tokens(
    clip, vfm_fn, x_norm_1chw: torch.Tensor, cfg: OpenVocabPreset, upsampler=None, scale: int = 1
) -> tuple[torch.Tensor, win.WindowBatch, tuple[int, int]]:
    """Per-window ProxyCLIP tokens before ln_post (n, C, hv, wv), the windows, the resized size.

    ``upsampler`` (a :class:`~zsdense.dense.upsamplers.LoadedUpsampler` for ``clip``): each
    window's tokens are brought to ``scale`` × its CLIP patch grid, guided by the window, so
    the spliced canvas is ``scale`` times finer (then resampled to SAM's grid as before)."""
    p = clip.patch_size
    x = win.trident_resize(x_norm_1chw, p, cfg.crop, upscale_small=cfg.upscale_small)
    wb = win.make_windows(x, cfg.crop, cfg.stride, pad_multiple=None)
    if any(s % p for s in wb.images.shape[-2:]):
        raise ConfigError(f"Trident windows must be multiples of the CLIP patch ({p})")
    feats = _batched(vfm_fn, wb.images, cfg.window_batch)  # (n, Cv, hv, wv)
    hv, wv = feats.shape[-2:]
    tok = lb.proxy_clip_tokens(
        clip,
        wb.images,
        feats.to(wb.images.dtype),
        beta=cfg.beta,
        gamma=cfg.gamma,
        mean_scope="batch",
    )  # (n, hv*wv, C)
    maps = tok.transpose(1, 2).reshape(tok.shape[0], -1, hv, wv)
    if upsampler is not None:
        maps = _batched(
            lambda i: upsampler.by_scale(wb.images[i], maps[i], scale),
            torch.arange(maps.shape[0]),
            cfg.window_batch,
        ).to(maps.dtype)
    return maps, wb, (int(x.shape[-2]), int(x.shape[-1]))


def trident_features(
    clip,
    vfm_fn,
    x_norm_1chw: torch.Tensor,
    sam_parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]],
    cfg: OpenVocabPreset,
    upsampler=None,
    scale: int = 1,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Trident dense features: L2-normalised (h·w, D) on SAM's valid grid, and that grid
    (``upsampler``: see :func:`trident_window_tokens`)."""
    maps, wb, (H, W) = trident_window_tokens(clip, vfm_fn, x_norm_1chw, cfg, upsampler, scale)
    p = clip.patch_size
    canvas = win.splice_tokens(maps, wb.patch_locs(p), (H // p, W // p))
    tokens, grid = agg.aggregate_canvas(
        canvas,
        sam_parts,
        cos_fac=cfg.cos_fac,
        refine_neg_cos=cfg.refine_neg_cos,
        chunk_rows=cfg.chunk_rows,
    )
    return F.normalize(clip.head(tokens.to(clip.dtype)).float(), dim=-1), grid


def _batched(fn, x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if not batch or x.shape[0] <= batch:
        return fn(x)
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)], dim=0)


def _sam_part(st) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """(attn, v, valid box) of a SAM state; accepts a capture already cropped to the box.

    Thin images (1×64, 3×2000: SAM's resized input under 16 px on a side) have a valid box of
    zero tokens on that side; it is taken as one token, i.e. the image is padded to one SAM patch
    as SAM itself pads it, and the scores are resized back to the input size afterwards."""
    valid = tuple(max(1, n) for n in agg.sam_valid_hw(st.input_size))
    if st.last_attn.shape[-1] == valid[0] * valid[1]:  # captured on the valid box only
        return st.last_attn, st.last_v[:, : valid[0], : valid[1]], None
    return st.last_attn, st.last_v, valid


def sam_parts_for(ctx, sam, strips: int) -> list[tuple[torch.Tensor, torch.Tensor, tuple]]:
    """SAM's last-block attention/values (+ valid box) for the image, or for ``strips`` vertical
    strips of it (Cityscapes). The whole-image encoding is shared through ``ctx.sam_state``."""
    if strips <= 1:
        return [_sam_part(ctx.sam_state(sam, capture_last_attn=True))]
    img = ctx.image_u8
    w = img.shape[1]
    bounds = [i * w // strips for i in range(strips)] + [w]
    parts = []
    for i in range(strips):
        st = ctx.get(
            ("sam-strip", sam.arch, strips, i),
            lambda i=i: sam.encode(
                np.ascontiguousarray(img[:, bounds[i] : bounds[i + 1]]), capture_last_attn=True
            ),
        )
        parts.append(_sam_part(st))
    return parts


# ---------------------------------------------------------------------------------------------
# SAM refinement


@dataclass
class ClassPrompts:
    """Connected components of one class at half resolution and their prompts."""

    cls: int
    masks: torch.Tensor  # (k, h2, w2) bool
    boxes_xyxy: torch.Tensor  # (k, 4) float, inclusive max, half-res pixels
    points_xy: torch.Tensor  # (k, 2) int64, half-res pixels
    mean_prob: torch.Tensor  # (k,)


def half_res_inputs(
    probs_khw: torch.Tensor, labels_hw: torch.Tensor, coarse_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs at (H//2, W//2) bilinear, label map at half res nearest with unknown = -1)."""
    H, W = labels_hw.shape
    h2, w2 = H // 2, W // 2
    ph = F.interpolate(probs_khw[None], size=(h2, w2), mode="bilinear", align_corners=False)[0]
    lh = F.interpolate(labels_hw[None, None].float(), size=(h2, w2), mode="nearest")[0, 0].long()
    if coarse_thresh > 0:
        lh = torch.where(ph.amax(dim=0) < coarse_thresh, torch.full_like(lh, -1), lh)
    return ph, lh


def component_prompts(
    probs_half: torch.Tensor,
    labels_half: torch.Tensor,
    coarse_thresh: float,
    min_area: int = 225,
) -> list[ClassPrompts]:
    """Per class (in order) its 8-connected components of at least ``min_area`` pixels, each with
    a box (x_min, y_min, x_max, y_max; inclusive) and one point at the first row-major argmax of
    the class probability inside the component. Classes whose half-res max probability is below
    ``coarse_thresh`` are skipped."""
    from scipy import ndimage

    out = []
    lab_np = labels_half.cpu().numpy()
    structure = np.ones((3, 3), dtype=bool)
    for c in range(probs_half.shape[0]):
        pc = probs_half[c]
        if float(pc.max()) < coarse_thresh:
            continue
        comp, n = ndimage.label(lab_np == c, structure=structure)
        masks, boxes, points, means = [], [], [], []
        for j in range(1, n + 1):
            m = comp == j
            if int(m.sum()) < min_area:
                continue
            ys, xs = np.nonzero(m)
            mt = torch.from_numpy(m).to(pc.device)
            masks.append(mt)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            flat = int(torch.argmax((pc * mt).reshape(-1)))
            points.append([flat % pc.shape[1], flat // pc.shape[1]])
            means.append(pc[mt].mean())
        if masks:
            out.append(
                ClassPrompts(
                    cls=c,
                    masks=torch.stack(masks),
                    boxes_xyxy=torch.tensor(boxes, dtype=torch.float32),
                    points_xy=torch.tensor(points, dtype=torch.int64),
                    mean_prob=torch.stack(means),
                )
            )
    return out


def _preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def dense_prompt(
    prob_half_hw: torch.Tensor,
    frame_hw: tuple[int, int],
    coarse_thresh: float,
    coef: float = 0.005,
    size: int = 256,
) -> torch.Tensor:
    """SAM's weak mask input (size, size): the half-res class probability resized to the
    ``size``-long-side shape of ``frame_hw``, values > coarse_thresh times ``coef`` (else 0),
    zero-padded right/bottom."""
    th, tw = _preprocess_shape(int(frame_hw[0]), int(frame_hw[1]), size)
    r = F.interpolate(
        prob_half_hw[None, None], size=(th, tw), mode="bilinear", align_corners=False
    )[0, 0]
    r = torch.where(r > coarse_thresh, r * coef, torch.zeros_like(r))
    return F.pad(r, (0, size - tw, 0, size - th))


def apply_coords(coords_xy: torch.Tensor, frame_hw: tuple[int, int], long_side: int = 1024):
    """ResizeLongestSide coordinate mapping from a frame of size ``frame_hw`` (x, y last)."""
    nh, nw = _preprocess_shape(int(frame_hw[0]), int(frame_hw[1]), long_side)
    c = coords_xy.clone().float()
    c[..., 0] = c[..., 0] * (nw / frame_hw[1])
    c[..., 1] = c[..., 1] * (nh / frame_hw[0])
    return c


SamDecode = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def predictor_decoder(predictor) -> SamDecode:
    """Adapter: a bound ``SamPredictor`` -> ``decode(point_coords, point_labels, boxes,
    mask_input) -> (low_res_logits (k,1,256,256), iou (k,1))``."""

    def decode(point_coords, point_labels, boxes, mask_input):
        dev = predictor.device
        _m, iou, low = predictor.predict_torch(
            point_coords.to(dev),
            point_labels.to(dev),
            boxes=boxes.to(dev),
            mask_input=mask_input.to(dev),
            multimask_output=False,
            return_logits=True,
        )
        return low, iou

    return decode


def postprocess_low_res(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    sam_original_size: tuple[int, int],
    image_hw: tuple[int, int],
    img_size: int = 1024,
) -> torch.Tensor:
    """SAM low-res logits (k,1,256,256) -> logits (k, H, W): to img_size, crop the valid input,
    to SAM's original size, then (if different) bilinear to the image size."""
    m = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    m = m[..., : input_size[0], : input_size[1]]
    m = F.interpolate(m, tuple(sam_original_size), mode="bilinear", align_corners=False)
    if tuple(sam_original_size) != tuple(image_hw):
        m = F.interpolate(m, tuple(image_hw), mode="bilinear", align_corners=False)
    return m[:, 0]


@dataclass
class RefineOutput:
    labels: torch.Tensor  # (H, W) int64
    probs: torch.Tensor  # (K, H, W) returned probability map
    prompts: list[ClassPrompts]
    kept_boxes_xyxy: torch.Tensor  # (m, 4) full-resolution boxes of kept masks (half-res × 2)
    calls: list[dict]


def sam_refine(
    probs_khw: torch.Tensor,
    labels_hw: torch.Tensor,
    decode: SamDecode,
    *,
    input_size: tuple[int, int],
    sam_original_size: tuple[int, int],
    coarse_thresh: float,
    min_area: int = 225,
    iou_thresh: float = 0.8,
    mask_coef: float = 0.005,
    reference_prompts: bool = True,
    img_size: int = 1024,
) -> RefineOutput:
    """Trident's SAM refinement of a coarse prediction (``specs/openvocab.md`` step 7).

    SAM is called once per class with all its components' boxes and points and one dense prompt.
    ``reference_prompts`` reproduces Trident: boxes/points mapped to SAM's frame as if the
    half-resolution size were the image size, and the dense prompt passed as a 3-D (1,256,256)
    tensor (SAM's prompt encoder then normalises over the wrong axis). Otherwise prompts are
    scaled to SAM's original frame first and the dense prompt is (k,1,256,256).
    Score per class = P_c × max over kept masks of sigmoid(logit), inside their union; label =
    argmax; pixels where every score is 0 keep the coarse label. Components whose mask failed the
    IoU test contribute P there to the returned probability map only.
    """
    H, W = labels_hw.shape
    probs_half, labels_half = half_res_inputs(probs_khw, labels_hw, coarse_thresh)
    h2, w2 = labels_half.shape
    prompts = component_prompts(probs_half, labels_half, coarse_thresh, min_area)
    scores = torch.zeros_like(probs_khw)
    failed = torch.zeros((H, W), dtype=torch.bool, device=probs_khw.device)
    kept_boxes, calls = [], []
    for cp in prompts:
        k = cp.masks.shape[0]
        pts = cp.points_xy.float()[:, None, :]  # (k, 1, 2)
        boxes = cp.boxes_xyxy.reshape(k, 2, 2)
        if reference_prompts:
            frame = (h2, w2)
            dense_frame = (H, W)
        else:
            sy, sx = sam_original_size[0] / h2, sam_original_size[1] / w2
            scale = torch.tensor([sx, sy])
            pts, boxes = pts * scale, boxes * scale
            frame = dense_frame = tuple(sam_original_size)
        pc = apply_coords(pts, frame, img_size)
        bx = apply_coords(boxes, frame, img_size).reshape(k, 4)
        dm = dense_prompt(probs_half[cp.cls], dense_frame, coarse_thresh, mask_coef)
        mask_input = dm[None] if reference_prompts else dm[None, None].expand(k, 1, -1, -1)
        labels_pt = torch.ones((k, 1), dtype=torch.float32)
        low, iou = decode(pc, labels_pt, bx, mask_input)
        calls.append(
            dict(
                cls=cp.cls, point_coords=pc, boxes=bx, mask_input=mask_input, iou=iou.detach().cpu()
            )
        )
        logits = postprocess_low_res(low.float(), input_size, sam_original_size, (H, W), img_size)
        logits = logits.to(probs_khw.device)
        keep = (iou.reshape(-1) > iou_thresh).to(probs_khw.device)
        for j in range(k):
            if not bool(keep[j]):
                up = F.interpolate(cp.masks[j][None, None].float(), size=(H, W), mode="nearest")
                failed |= up[0, 0] > 0
        if bool(keep.any()):
            lk = logits[keep]
            best = torch.sigmoid(lk).amax(dim=0)
            union = (lk > 0).any(dim=0)
            scores[cp.cls] = probs_khw[cp.cls] * best * union
            kept_boxes.append(cp.boxes_xyxy[keep.cpu()] * 2)
    labels = class_max(scores)[1]
    none = (scores == 0).all(dim=0)
    labels = torch.where(none, labels_hw, labels)
    out_probs = torch.maximum(scores, probs_khw * failed)
    kb = torch.cat(kept_boxes) if kept_boxes else torch.zeros((0, 4))
    return RefineOutput(labels, out_probs, prompts, kb, calls)


# ---------------------------------------------------------------------------------------------
# segment-then-splice presets


def slide_features(
    clip,
    x_norm_1chw: torch.Tensor,
    cfg: OpenVocabPreset,
    vfm_fn=None,
    upsampler=None,
    scale: int = 1,
) -> tuple[torch.Tensor, win.WindowBatch]:
    """Per-window L2-normalised dense features (n, D, gh, gw) for ProxyCLIP / SCLIP / ClearCLIP /
    NACLIP, and the windows (boxes, padding) they came from.

    ``upsampler`` (a :class:`~zsdense.dense.upsamplers.LoadedUpsampler` for ``clip``): each
    window's features are brought to ``scale`` × its CLIP patch grid, guided by the window
    (JAFAR's attention from CLIP's own patch features), and L2-normalised again, before the
    text similarity; the window logits are then spliced as before."""
    h, w = x_norm_1chw.shape[-2:]
    if cfg.whole_image:
        crop = stride = (int(h), int(w))
    else:
        crop, stride = cfg.crop, cfg.stride
    wb = win.make_windows(x_norm_1chw, crop, stride, pad_multiple=cfg.pad_multiple)

    method = get_method(cfg.method)

    def features(xb: torch.Tensor) -> torch.Tensor:
        f = method.features(clip, xb, cfg, vfm_fn)
        if upsampler is None:
            return f
        return F.normalize(upsampler.by_scale(xb, f, scale), dim=1).to(f.dtype)

    return _batched(features, wb.images, cfg.window_batch), wb


def slide_cos_logits(
    feats_ndhw: torch.Tensor, wb: win.WindowBatch, text_qd: torch.Tensor, image_hw: tuple[int, int]
) -> torch.Tensor:
    """Segment-then-splice: per-window cosine logits averaged into (Q, h, w) (resized image)."""
    logits = torch.einsum(
        "ndhw,qd->nqhw", feats_ndhw, text_qd.to(feats_ndhw.device, feats_ndhw.dtype)
    )
    return win.splice_logits(logits, wb.boxes, wb.pads, image_hw)


# ---------------------------------------------------------------------------------------------
# entry point


def _dense_key(cfg: OpenVocabPreset, clip, extra: tuple = ()) -> tuple:
    return (
        "openvocab-dense",
        cfg.method,
        clip.arch,
        cfg.vfm,
        cfg.sam_arch,
        cfg.short_side,
        cfg.max_long_side,
        cfg.crop,
        cfg.stride,
        cfg.whole_image,
        cfg.pad_multiple,
        cfg.beta,
        cfg.gamma,
        cfg.cos_fac,
        cfg.refine_neg_cos,
        cfg.sam_strips,
        cfg.naclip_sigma,
        cfg.upscale_small,
    ) + extra


def run_open_vocab(
    rt, ctxs: Sequence, options: OpenVocabOptions | None = None, /, **kwargs: Any
) -> list[OpenVocabResult]:
    """Open-vocabulary segmentation of each image context.

    ``options``: an :class:`~zsdense.options.OpenVocabOptions`, or keyword arguments mapped onto
    one: ``classes`` (a list of names with synonyms separated by ``;``, a class string
    ``"a; b, c"``, ``file:NAME``), ``classes_file``, ``preset`` (any registered preset: trident,
    trident-fixed, proxyclip, sclip, clearclip, naclip, ...), ``dataset`` (voc21, context60, ...);
    other keys override preset fields (``sam_refine=True``, ``prob_thd=0.3``, ``upsample="jbu"``).
    """
    opts = _options(options, kwargs)
    cfg = opts.config()
    clip = rt.clip(cfg.clip_arch)
    clf = build_classifier(clip, list(opts.classes), cache=rt.text_cache)
    method = get_method(cfg.method)
    dino = rt.dinov2(cfg.vfm) if method.needs_vfm else None
    sam = rt.sam(cfg.sam_arch or "vit_b") if method.needs_sam else None
    vfm_fn = vfm_on_clip_windows(dino) if dino is not None else None
    up = feature_upsampler(rt, opts, clip)
    scale = opts.upsampler_factor if up is not None else 1
    return [_run_one(rt, ctx, cfg, clip, clf, vfm_fn, sam, up, scale) for ctx in ctxs]


def feature_upsampler(rt, options: OpenVocabOptions, clip=None):
    """The ``--upsampler`` of the options made for the preset's CLIP (None: bilinear), loaded
    once per runtime (:func:`zsdense.dense.upsamplers.load_upsampler`)."""
    from zsdense.dense.upsamplers import BILINEAR, load_upsampler

    if options.upsampler == BILINEAR:
        return None
    return load_upsampler(rt, options.upsampler, clip or rt.clip(options.config().clip_arch))


def _upsampler_meta(up, scale: int) -> dict:
    if up is None:
        return {"upsampler": "bilinear"}
    return {
        **up.record,
        "scale": int(scale),
        "compared": "window features upsampled to scale x the CLIP patch grid, then the text",
    }


def _options(options: OpenVocabOptions | None, kwargs: dict) -> OpenVocabOptions:
    if options is None:
        return OpenVocabOptions.from_mapping(kwargs)
    if kwargs:
        raise ConfigError("give an OpenVocabOptions or keyword options, not both")
    return options


def load_encoders(rt, options: OpenVocabOptions) -> None:
    """Load every model the options need (a run's setup, before its first image)."""
    cfg = options.config()
    method = get_method(cfg.method)
    feature_upsampler(rt, options, rt.clip(cfg.clip_arch))
    if method.needs_vfm:
        rt.dinov2(cfg.vfm)
    if method.needs_sam:
        rt.sam(cfg.sam_arch or "vit_b")


def _run_one(
    rt, ctx, cfg: OpenVocabPreset, clip, clf: TextClassifier, vfm_fn, sam, up=None, scale=1
):
    H, W = ctx.size
    size = mmseg_resize_hw((H, W), cfg.short_side, cfg.max_long_side)
    text = clf.weights
    meta: dict = dict(rt.result_meta())
    meta.update(preset=cfg.name, method=cfg.method, resized_hw=list(size))
    meta["upsampler"] = _upsampler_meta(up, scale)
    extra = () if up is None else ("upsampler", up.spec.text, int(scale))
    with rt.autocast():
        x = clip.normalize(resize_image(ctx.image, size).to(clip.device))
        if get_method(cfg.method).pipeline == "splice-then-segment":
            feats, grid = ctx.get(
                _dense_key(cfg, clip, extra),
                lambda: trident_features(
                    clip, vfm_fn, x, sam_parts_for(ctx, sam, cfg.sam_strips), cfg, up, scale
                ),
            )
            low = (feats @ text.to(feats.device).T).T.reshape(-1, grid[0], grid[1])
            meta["sam_grid"] = list(grid)
        else:
            feats, wb = ctx.get(
                _dense_key(cfg, clip, extra),
                lambda: slide_features(clip, x, cfg, vfm_fn, up, scale),
            )
            low = slide_cos_logits(feats, wb, text, size)
        guide = torch.from_numpy(ctx.image) if cfg.upsample == "jbu" else None
        cos = upsample_scores(low.float(), (H, W), cfg.upsample, guide_hwc=guide)
        if cfg.pamr:
            img = torch.from_numpy(ctx.image).permute(2, 0, 1)[None].to(cos.device)
            cos = pamr(
                img, cos[None], num_iter=cfg.pamr_iters, dilations=tuple(cfg.pamr_dilations)
            )[0]
        probs, labels = coarse_decision(clf, cos, cfg.logit_scale, cfg.prob_thd)
        if cfg.sam_refine:
            st = ctx.sam_state(sam, capture_last_attn=False)
            ref = sam_refine(
                probs,
                labels,
                predictor_decoder(sam.predictor_for(st)),
                input_size=st.input_size,
                sam_original_size=st.original_size,
                coarse_thresh=cfg.coarse_thresh,
                min_area=cfg.min_area,
                iou_thresh=cfg.sam_iou_thresh,
                mask_coef=cfg.sam_mask_coef,
                reference_prompts=cfg.reference_prompts,
                img_size=sam.img_size,
            )
            labels, probs = ref.labels, ref.probs
            meta["sam_prompts"] = int(sum(p.masks.shape[0] for p in ref.prompts))
            meta["sam_masks_kept"] = int(ref.kept_boxes_xyxy.shape[0])
    res = OpenVocabResult(
        labels=labels.cpu().numpy().astype(np.int64),
        probs=probs.float().cpu().numpy().astype(np.float32),
        class_names=clf.class_names,
        meta=meta,
    )
    res.meta["areas"] = res.areas()
    return res


__all__ = [
    "OpenVocabResult",
    "run_open_vocab",
    "sam_refine",
    "component_prompts",
    "trident_features",
    "slide_cos_logits",
    "mmseg_resize_hw",
]
