"""Methods as plug-ins: a package installed beside zsdense adds an open-vocabulary method and a
referring method, one file each, through the ``zsdense.methods`` entry-point group, with no edit
of zsdense; they run from the CLI and from Python. A broken plug-in is one warning.

The plug-in "installation" is a distribution on ``sys.path``: the package folder and its
``*.dist-info`` (METADATA + entry_points.txt), what pip writes for a wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense import plugins
from zsdense.config import OPENVOCAB_PRESETS, REFER_PRESETS
from zsdense.dense.methods import METHODS
from zsdense.tasks.referring import REFER_METHODS

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

OV_FILE = '''
"""A toy open-vocabulary method: pooled pixels projected to the text width (not a model)."""
import torch
import torch.nn.functional as F

from zsdense.dense.methods import register_method


def features(clip, x_norm_bchw, cfg, vfm_fn):
    pooled = F.avg_pool2d(x_norm_bchw.float(), clip.patch_size)  # (B, 3, h, w)
    zeros = torch.zeros(1, 1, clip.width, device=x_norm_bchw.device, dtype=clip.dtype)
    d = clip.head(zeros).shape[-1]
    proj = torch.linspace(-1, 1, 3 * d, device=pooled.device).reshape(d, 3)
    return F.normalize(torch.einsum("dc,bchw->bdhw", proj, pooled), dim=1)


register_method(
    "toyov",
    features,
    description="toy plug-in method",
    presets={"toyov": {"crop": 224}, "toyov-small": {"crop": 112, "description": "toy, small"}},
    datasets={"voc21": {"prob_thd": 0.3}},
)
'''

REFER_FILE = '''
"""A toy referring method: the half of the image the expression's direction names."""
import numpy as np

from zsdense.tasks.referring import ReferResult, register_refer_method

CALLS = []


def run(rt, ctx, expr, preset):
    CALLS.append((expr.noun_phrase, expr.direction, preset.name))
    h, w = ctx.size
    mask = np.zeros((h, w), dtype=bool)
    if expr.direction == "right":
        mask[:, w // 2 :] = True
    else:
        mask[:, : w // 2] = True
    return ReferResult(mask=mask, score=0.25, candidates=[], meta={"toy": expr.noun_phrase})


def register():  # the entry point names this callable (no argument)
    register_refer_method(
        "toyrefer", run, encoders=(), description="toy plug-in referring method",
        presets={"toyrefer": {"parser": "fallback"}},
    )
'''

BROKEN_FILE = """
from zsdense.dense.methods import register_method

register_method("halfbroken", lambda *a: None, description="registered, then the module fails")
raise RuntimeError("this plug-in is broken on purpose")
"""


def _dist(root: Path, name: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[zsdense.methods]\n{eps}")


@pytest.fixture
def site(tmp_path_factory) -> Path:
    """A folder holding the toy plug-in and a broken one, as pip would install them."""
    root = tmp_path_factory.mktemp("site")
    pkg = root / "zsdense_toyplug"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ov.py").write_text(textwrap.dedent(OV_FILE))
    (pkg / "refer.py").write_text(textwrap.dedent(REFER_FILE))
    _dist(root, "zsdense-toyplug", {"toyov": "zsdense_toyplug.ov"})
    (root / "zsdense_broken.py").write_text(textwrap.dedent(BROKEN_FILE))
    _dist(
        root,
        "zsdense-broken",
        {"broken": "zsdense_broken", "missing": "zsdense_no_such_module_xyz"},
    )
    # the referring method comes from a second distribution, in its callable form
    _dist(root, "zsdense-toyrefer", {"toyrefer": "zsdense_toyplug.refer:register"})
    return root


@pytest.fixture
def installed(site, monkeypatch):
    """The plug-ins on sys.path and loaded; withdrawn again afterwards."""
    monkeypatch.syspath_prepend(str(site))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", plugins.PluginWarning)
        plugins.reload_plugins()
    yield [w for w in caught if issubclass(w.category, plugins.PluginWarning)]
    monkeypatch.undo()
    for mod in [m for m in sys.modules if m.startswith(("zsdense_toyplug", "zsdense_broken"))]:
        sys.modules.pop(mod)
    plugins.reload_plugins()
    assert "toyov" not in METHODS and "toyrefer" not in REFER_METHODS


def _main(args, capsys) -> tuple[int, str, str]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out, cap.err


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 56 + 8 * i, 3)) * 255).astype(np.uint8)).save(
            d / f"im{i}.png"
        )
    return d


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]


def test_plugins_register_their_methods_and_presets(installed):
    assert {"toyov": "zsdense-toyplug", "toyrefer": "zsdense-toyrefer"} == {
        s.name: s.dist for s in plugins.plugin_status() if s.error is None and s.dist != "zsdense"
    }
    assert METHODS["toyov"].description == "toy plug-in method"
    assert OPENVOCAB_PRESETS["toyov-small"].crop == 112
    assert OPENVOCAB_PRESETS["toyov-small"].method == "toyov"
    from zsdense.config import openvocab_preset

    assert openvocab_preset("toyov", "voc21").prob_thd == 0.3
    assert REFER_METHODS["toyrefer"].encoders == ()
    assert REFER_PRESETS["toyrefer"].method == "toyrefer"
    assert REFER_PRESETS["toyrefer"].parser == "fallback"
    assert METHODS.owner("toyov") == "zsdense-toyplug:toyov"
    assert METHODS.owner("sclip") == "zsdense"


def test_a_broken_plugin_is_one_warning_and_is_withdrawn(installed):
    msgs = [str(w.message) for w in installed]
    assert len(msgs) == 2, msgs  # one per failing entry point, nothing else
    broken = next(m for m in msgs if "'broken'" in m)
    assert "zsdense-broken" in broken and "RuntimeError: this plug-in is broken" in broken
    missing = next(m for m in msgs if "'missing'" in m)
    assert "zsdense-broken" in missing and "zsdense_no_such_module_xyz" in missing
    # what the broken module registered before failing is withdrawn
    assert "halfbroken" not in METHODS and "halfbroken" not in OPENVOCAB_PRESETS
    failed = {s.name: s.error for s in plugins.plugin_status() if s.error}
    assert set(failed) == {"broken", "missing"}


def test_plugins_are_cli_choices_and_run(installed, images, tmp_path, capsys):
    code, out, err = _main(["openvocab", "--help"], capsys)
    assert code == 0 and "toyov" in out and "toyov-small" in out
    code, out, err = _main(["refer", "--help"], capsys)
    assert code == 0 and "toyrefer" in out
    code, out, err = _main(["info", "--methods"], capsys)
    assert code == 0 and "| `toyov-small` | toyov | CLIP |" in out and "toy, small" in out
    assert "| `toyrefer` | toyrefer | - | toy plug-in referring method |" in out

    o1 = tmp_path / "ov"
    code, out, err = _main(
        ["openvocab", images, "--out", o1, "--classes", "a, b", "--preset", "toyov-small"]
        + ["--models", "tiny", "-q", "--no-overlay"],
        capsys,
    )
    assert code == 0, err
    recs = _records(o1)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    assert {r["meta"]["result"]["method"] for r in recs} == {"toyov"}
    assert {r["meta"]["result"]["preset"] for r in recs} == {"toyov-small"}

    o2 = tmp_path / "refer"
    img = sorted(images.iterdir())[0]
    code, out, err = _main(
        ["refer", img, "--out", o2, "--text", "the thing on the right", "--preset", "toyrefer"]
        + ["--models", "tiny", "-q", "--no-overlay"],
        capsys,
    )
    assert code == 0, err
    (rec,) = _records(o2)
    assert rec["status"] == "ok" and rec["fallback"] is False
    assert rec["scores"]["score"] == 0.25
    assert rec["meta"]["result"]["method"] == "toyrefer"
    assert rec["meta"]["result"]["toy"] == "the thing"
    mask = np.asarray(Image.open(o2 / rec["outputs"]["mask"]))
    w = mask.shape[1]
    assert mask[:, w // 2 :].min() == 255 and mask[:, : w // 2].max() == 0


def test_plugins_run_from_python(installed, images):
    from zsdense import Segmenter

    seg = Segmenter(models="tiny")
    img = str(sorted(images.iterdir())[1])
    r = seg.open_vocab(img, classes="a, b; c", preset="toyov")
    assert r.meta["method"] == "toyov" and r.labels.shape == (40, 64)
    q = seg.refer(img, "the cup on the left", preset="toyrefer")
    assert q.meta["method"] == "toyrefer" and q.meta["parser"] == "fallback"
    assert q.mask[:, :32].all() and not q.mask[:, 32:].any() and q.score == 0.25
    calls = sys.modules["zsdense_toyplug.refer"].CALLS
    assert calls[-1] == ("the cup", "left", "toyrefer")


def test_plugins_load_lazily_and_before_the_cli_parses(site):
    """A fresh interpreter: ``import zsdense`` (and the API) loads no plug-in; the first registry
    read does; the CLI loads them before parsing (``--preset toyrefer`` is valid) and reports the
    broken plug-in once, on one line."""
    code = textwrap.dedent(
        """
        import sys
        import zsdense, zsdense.api, zsdense.config
        from zsdense import plugins
        assert not plugins.plugins_loaded(), "loaded at import"
        assert "zsdense.methods" not in sys.modules
        from zsdense.cli.main import main
        main(["refer", "--help"])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore::FutureWarning"}
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=site,
    )
    assert p.returncode == 0, p.stderr
    assert "toyrefer" in p.stdout
    lines = [x for x in p.stderr.splitlines() if "plug-in" in x]
    assert len(lines) == 2, p.stderr  # the two failing entry points of zsdense-broken
    assert all(x.startswith("zsdense: warning: ") for x in lines)
    assert "Traceback" not in p.stderr


# ---- the registry itself (what every family, the anomaly scorers included, builds on) ------


def test_registry_reads_load_and_failures_withdraw(monkeypatch):
    reg = plugins.Registry("test entry")
    loads = []
    monkeypatch.setattr(plugins, "load_plugins", lambda: loads.append(1))
    reg["a"] = 1  # writes never load
    assert loads == []
    for read in (lambda: "a" in reg, lambda: reg["a"], lambda: len(reg), lambda: iter(reg)):
        before = len(loads)
        read()
        assert len(loads) == before + 1  # every kind of read loads (once per process, really)
    assert dict(reg) == {"a": 1}
    with plugins.registering_as("dist:ep"):
        reg["b"] = 2
    assert reg.owner("b") == "dist:ep" and reg.owner("a") == plugins.BUILTIN_OWNER
    assert reg.withdraw("dist:ep") == ["b"] and reg.current() == {"a": 1}


def test_load_one_reports_a_target_that_is_neither_module_nor_callable():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", plugins.PluginWarning)
        plugins._load_one("odd", "some-dist", "pkg:CONSTANT", lambda: 42)
    (w,) = caught
    assert "some-dist" in str(w.message) and "neither a module nor a callable" in str(w.message)
    assert plugins._status.pop().error.startswith("TypeError")
