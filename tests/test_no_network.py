"""Downloads allowed but the network down: one attempt per checkpoint, one message, exit 2."""

from __future__ import annotations

import errno
import time
import urllib.error
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from zsdense.errors import WeightsError
from zsdense.models import registry


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Empty caches, downloads allowed, every download fails with 'network unreachable'."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("HF_HUB_CACHE", "XDG_CACHE_HOME", "ZSDENSE_WEIGHTS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ZSDENSE_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls: Counter = Counter()

    def down(ck, specs, weights_dir, progress):  # noqa: ARG001
        calls[ck.name] += 1
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(registry, "_download", down)
    registry.forget_failed_downloads()
    yield calls
    registry.forget_failed_downloads()


def test_anomaly_without_network_exits_2_fast_with_one_message(tmp_path, no_network, capsys):
    from zsdense.cli.main import main

    d = tmp_path / "d"
    d.mkdir()
    for i in range(4):
        arr = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"im{i}.png")
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["anomaly", str(d), "--out", str(tmp_path / "o")])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert elapsed < 10
    assert err.count("error:") == 1 and "network cannot be reached" in err
    assert no_network and all(n == 1 for n in no_network.values()), no_network
    assert "Traceback" not in err and "Retrying" not in err


def test_network_failure_remembered_per_checkpoint(no_network):
    name = "clip-ViT-L-14-336-openai"
    for _ in range(3):
        with pytest.raises(WeightsError, match="network cannot be reached"):
            registry.resolve(name, download=True, progress=False)
    assert no_network[name] == 1  # one attempt, not one per alternative source or call
    registry.forget_failed_downloads()
    with pytest.raises(WeightsError):
        registry.resolve(name, download=True, progress=False)
    assert no_network[name] == 2


def test_http_errors_are_not_network_down():
    http = urllib.error.HTTPError("u", 404, "Not Found", None, None)
    assert not registry.is_network_error(http)
    assert not registry.is_network_error(urllib.error.URLError(FileNotFoundError(2, "x")))
    assert registry.is_network_error(urllib.error.URLError(ConnectionRefusedError()))
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as inner:
            raise RuntimeError("hub failed") from inner
    except RuntimeError as outer:
        assert registry.is_network_error(outer)
