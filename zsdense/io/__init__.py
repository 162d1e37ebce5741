"""Image I/O at the edges of the pipeline: readers, input listing, atomic writers, manifest."""

from __future__ import annotations

from zsdense.io.inputs import InputItem, ListedInputs, SkippedInput, list_inputs
from zsdense.io.manifest import MANIFEST_NAME, Manifest, WorkItem, is_complete, record_key
from zsdense.io.readers import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageRecord,
    detect_format,
    iter_image_records,
    read_image,
    read_image_records,
    to_float_rgb,
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

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_EXTENSIONS",
    "ImageRecord",
    "InputItem",
    "ListedInputs",
    "MANIFEST_NAME",
    "Manifest",
    "WorkItem",
    "atomic_path",
    "detect_format",
    "is_complete",
    "iter_image_records",
    "jet_colors",
    "list_inputs",
    "mask_to_rle",
    "read_image",
    "read_image_records",
    "record_key",
    "rle_to_mask",
    "SkippedInput",
    "to_float_rgb",
    "to_jsonable",
    "voc_palette",
    "write_json",
    "write_label_png",
    "write_map_npy",
    "write_map_tiff",
    "write_mask_png",
    "write_overlay_jpg",
    "write_rle_json",
]
