"""Fixtures shared by the Triton backend's tests."""
import pytest


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide channel tiles, 32-long length tiles, a few wgrad splits, and fused
    finalizes with groups of 2 tiles (several groups, the last one ragged), so that small
    shapes span several tiles with ragged edges. Layer norm's tiles keep every channel all
    the same (tiling.layer_norm_forward_config, layer_norm_backward_tiles)."""
    from fastres.backends.triton import tiling
    monkeypatch.setattr(tiling, "MAX_BLOCK_CO", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_CI", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_L", 32)
    monkeypatch.setattr(tiling, "MAX_WGRAD_SPLITS", 2)
    monkeypatch.setattr(tiling, "FINALIZE_GROUP", 2)
    return tiling
