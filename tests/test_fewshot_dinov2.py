"""The DINOv2 wrapper's torch-hub positional-embedding resize (an option; default unchanged)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from zsdense.models.dinov2 import build_dinov2


def test_hub_resize_for_register_models_equals_transformers():
    """Hub ``_reg`` models resize with size= and antialias: transformers' own path (F1)."""
    dino = build_dinov2("dinov2-reg-small", tiny=True)
    hub = replace(
        dino, pos_interp="hub", hub_interpolate_offset=0.0, hub_interpolate_antialias=True
    )
    x = torch.randn(1, 3, 14 * 5, 14 * 7, generator=torch.Generator().manual_seed(0))
    a = dino.tokens(x)
    b = hub.tokens(x)
    assert a.shape == b.shape == (1, 1 + dino.num_registers + 35, dino.width)
    assert torch.allclose(a, b, atol=1e-5)


def test_hub_offset_resize_is_scale_factor_bicubic():
    dino = replace(build_dinov2("dinov2-small", tiny=True), pos_interp="hub")
    pos = dino.model.embeddings.position_embeddings
    g = int((pos.shape[1] - 1) ** 0.5)
    got = dino.hub_pos_embed((5, 7))
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(5.1 / g, 7.1 / g), mode="bicubic", antialias=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 35, -1)
    assert torch.equal(got[:, 1:], ref) and torch.equal(got[:, :1], pos[:, :1])
    # ... and it is not what transformers does (size=), so the features differ
    x = torch.randn(1, 3, 70, 98, generator=torch.Generator().manual_seed(1))
    assert (dino.tokens(x) - dino.tokens(x, pos_interp="transformers")).abs().max() > 1e-3
    # the grid the embedding was trained on, square: no resize at all
    assert torch.equal(dino.hub_pos_embed((g, g)), pos)
    # the default stays the model's own behaviour
    assert build_dinov2("dinov2-small", tiny=True).pos_interp == "transformers"
