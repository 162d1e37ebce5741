"""Defects as instances: the connected components of a mask, with box, area and map statistics.

A mask says *where*; an inspection or a detector downstream wants *how many and which*: every
8-connected component of a binary mask (8-connectivity, as the ground-truth regions of AUPRO in
:mod:`zsdense.metrics`) becomes one instance::

    {"id": 1, "box_xywh": [x, y, w, h], "area": 112, "score_max": 0.93, "score_mean": 0.71}

``box_xywh`` is in pixels of the mask (integer, inclusive-exclusive: the component covers columns
``x .. x + w - 1``), ``area`` its pixel count, ``score_max`` / ``score_mean`` the maximum and mean
of a score map (the anomaly map, a class probability) over the component's pixels (absent
without a map). Instances are ordered by decreasing area (ties: raster order of their first
pixel) and numbered from 1 in that order. Open-vocabulary label maps give one list per class
(``class`` and ``class_index`` added); a referring mask is one instance whatever its pieces.

:func:`to_supervision` turns instances into ``supervision.Detections`` (the optional extra
``zsdense[supervision]``), :func:`instance_masks` gives the boolean mask of each instance (the
COCO export encodes them as RLE).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from zsdense.errors import DependencyError

__all__ = [
    "MANIFEST_MAX_INSTANCES",
    "label_components",
    "mask_instances",
    "label_map_instances",
    "whole_mask_instance",
    "instance_masks",
    "to_supervision",
    "manifest_instances",
]

# a noisy mask can hold thousands of specks: the manifest keeps the largest ones (the Python
# result keeps them all); ``instances_total`` in the record says how many there were
MANIFEST_MAX_INSTANCES = 100
_EIGHT = np.ones((3, 3), dtype=bool)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D mask: (labels (H, W) int32, count)."""
    from scipy import ndimage

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    lab, n = ndimage.label(m.astype(bool, copy=False), structure=_EIGHT)
    return lab.astype(np.int32, copy=False), int(n)


def _components(
    lab: np.ndarray, n: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat indices of the mask's pixels in raster order, their component labels, the areas
    of components 1..n): one scan of the label image, shared by every statistic. ``mask``: the
    boolean mask ``lab`` labels, whose scan finds the same pixels 4x faster (a byte a pixel
    against the labels' four)."""
    flat = lab.ravel()
    fg = np.flatnonzero(flat if mask is None else mask.ravel())
    comp = flat[fg]
    return fg, comp, np.bincount(comp, minlength=n + 1)[1:]


def _ordered(areas: np.ndarray) -> np.ndarray:
    """Component labels (1..n) by decreasing area, ties in raster order (label order)."""
    n = len(areas)
    return np.lexsort((np.arange(n), -areas)) + 1  # last key first: area desc, then label asc


def _stats(
    lab: np.ndarray,
    fg: np.ndarray,
    comp: np.ndarray,
    areas: np.ndarray,
    score_map: np.ndarray | None,
) -> list[dict]:
    from scipy import ndimage

    boxes = ndimage.find_objects(lab)
    smax = smean = None
    if score_map is not None:
        s = np.asarray(score_map)
        if s.shape != lab.shape:
            raise ValueError(f"score map {s.shape} and mask {lab.shape} differ in shape")
        # over the mask's pixels only, without sorting them (ndimage.maximum sorts every pixel
        # by label: 18 ms for a 480x640 map): the max is order-free, and the mean is the same
        # raster-order sum over the same count as ndimage.mean's; only those pixels are
        # converted to float64
        vals = s.ravel()[fg].astype(np.float64)
        smax = np.full(len(boxes) + 1, -np.inf)
        np.maximum.at(smax, comp, vals)
        smax = smax[1:]
        sums = np.bincount(comp, weights=vals, minlength=len(boxes) + 1)[1:]
        smean = sums / areas  # the components' pixel counts, already counted
    out = []
    for rank, k in enumerate(_ordered(areas), start=1):
        sl = boxes[k - 1]
        y0, y1 = sl[0].start, sl[0].stop
        x0, x1 = sl[1].start, sl[1].stop
        inst: dict[str, Any] = {
            "id": rank,
            "box_xywh": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
            "area": int(areas[k - 1]),
        }
        if smax is not None:
            inst["score_max"] = float(smax[k - 1])
            inst["score_mean"] = float(smean[k - 1])
        out.append(inst)
    return out


def mask_instances(mask: np.ndarray, score_map: np.ndarray | None = None) -> list[dict]:
    """The instances (see the module docstring) of a binary ``mask`` (H, W), with the max and
    mean of ``score_map`` (H, W) over each when given."""
    m = np.asarray(mask).astype(bool, copy=False)
    lab, n = label_components(m)
    if n == 0:
        return []
    fg, comp, areas = _components(lab, n, m)
    return _stats(lab, fg, comp, areas, score_map)


def label_map_instances(
    labels: np.ndarray,
    class_names: Sequence[str],
    probs: np.ndarray | None = None,
    skip: Sequence[int] = (),
) -> list[dict]:
    """Per class present in ``labels`` (H, W), its instances with ``class`` and ``class_index``
    (classes in index order; ids numbered across the whole list). ``probs`` (K, H, W): the
    class's own probability gives ``score_max`` / ``score_mean``. ``skip``: class indices left
    out."""
    lab_map = np.asarray(labels)
    out: list[dict] = []
    present = [int(k) for k in np.unique(lab_map) if int(k) >= 0 and int(k) not in set(skip)]
    for k in present:
        prob = None if probs is None else np.asarray(probs)[k]
        for inst in mask_instances(lab_map == k, prob):
            name = class_names[k] if k < len(class_names) else f"label {k}"
            out.append({**inst, "class": str(name), "class_index": k})
    for i, inst in enumerate(out, start=1):
        inst["id"] = i
    return out


def whole_mask_instance(mask: np.ndarray, score: float | None = None) -> list[dict]:
    """One instance for a whole mask (a referring result): its bounding box and area, ``score``
    as both statistics; no instance for an empty mask."""
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return []
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    inst: dict[str, Any] = {
        "id": 1,
        "box_xywh": [
            int(cols[0]),
            int(rows[0]),
            int(cols[-1] - cols[0] + 1),
            int(rows[-1] - rows[0] + 1),
        ],
        "area": int(m.sum()),
    }
    if score is not None:
        inst["score_max"] = inst["score_mean"] = float(score)
    return [inst]


def instance_masks(
    mask_or_labels: np.ndarray, instances: Sequence[dict], whole: bool = False
) -> list[np.ndarray]:
    """The boolean (H, W) mask of each instance, in the order of ``instances``.

    ``mask_or_labels``: the binary mask the instances came from, or the label map (instances
    with ``class_index``). ``whole``: one instance is the whole mask (referring)."""
    arr = np.asarray(mask_or_labels)
    if whole:
        return [arr.astype(bool)] if instances else []
    out: list[np.ndarray] = []
    cache: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    seen: dict[Any, int] = {}  # instances of a class so far: its rank inside the class
    for inst in instances:
        k = inst.get("class_index")
        if k not in cache:
            m = arr == k if k is not None else arr.astype(bool)
            lab, n = label_components(m)
            cache[k] = (lab, _ordered(_components(lab, n, m)[2]) if n else np.zeros(0, dtype=int))
        lab, labels = cache[k]
        rank = seen.get(k, 0)
        seen[k] = rank + 1
        out.append(lab == labels[rank])
    return out


def manifest_instances(instances: list[dict]) -> tuple[list[dict], int | None]:
    """What a manifest line keeps: the first :data:`MANIFEST_MAX_INSTANCES` (largest first) and
    the total when some were left out (else None)."""
    if len(instances) <= MANIFEST_MAX_INSTANCES:
        return instances, None
    return instances[:MANIFEST_MAX_INSTANCES], len(instances)


def to_supervision(
    instances: Sequence[dict],
    masks: Sequence[np.ndarray],
    shape_hw: tuple[int, int],
    *,
    class_names: Sequence[str] = ("anomaly",),
    confidence_key: str = "score_max",
    confidence: float | None = None,
) -> Any:
    """``supervision.Detections`` of instances: ``xyxy`` boxes (N, 4) float, ``mask`` (N, H, W)
    bool, ``confidence`` (N,) (``confidence_key`` of each instance, or the one ``confidence``),
    ``class_id`` (N,) (``class_index``, else 0) and ``data["class_name"]``."""
    try:
        import supervision as sv
    except ImportError as exc:
        raise DependencyError("supervision", "supervision", "result.to_supervision()") from exc
    n = len(instances)
    h, w = int(shape_hw[0]), int(shape_hw[1])
    xyxy = np.zeros((n, 4), dtype=np.float32)
    conf = np.zeros(n, dtype=np.float32)
    cls = np.zeros(n, dtype=int)
    names = []
    for i, inst in enumerate(instances):
        x, y, bw, bh = inst["box_xywh"]
        xyxy[i] = (x, y, x + bw, y + bh)
        c = confidence if confidence is not None else inst.get(confidence_key, 1.0)
        conf[i] = float(c)
        cls[i] = int(inst.get("class_index", 0))
        names.append(str(inst.get("class", class_names[0] if class_names else "object")))
    mask = np.stack(list(masks)).astype(bool) if n else np.zeros((0, h, w), dtype=bool)
    return sv.Detections(
        xyxy=xyxy,
        mask=mask,
        confidence=conf,
        class_id=cls,
        data={"class_name": np.asarray(names, dtype=str)},
    )
