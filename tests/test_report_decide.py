"""report.html to decide with: score histogram, original | map | mask | overlay per image, the
threshold sliders with the ``zsdense decide`` command, failures named with the rerun hint,
labelled multi-task rows, a bounded size, and (in a real headless browser) mask pixel counts that
equal what Python computes from the same maps within the quantisation."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from zsdense.engine.report import write_report
from zsdense.engine.report_view import (
    CODES,
    VIEW_BYTES_MAX,
    code_threshold,
    make_view,
    quantise,
    small_codes,
)

TINY = ["--models", "tiny", "--precision", "fp32"]


def _cli(args, capsys):
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


def _data(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for sub, n in (("good", 2), ("bad", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(60, 120, (36 + 8 * i, 44, 3), dtype=np.uint8)
            if sub == "bad":
                a[6:20, 10:26] = 235
            Image.fromarray(a).save(root / sub / f"{i}.png")
    (root / "bad" / "broken.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import contextlib
    import io

    from zsdense.cli.main import main

    root = tmp_path_factory.mktemp("report")
    data = _data(root / "data")
    out = root / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["anomaly", str(data), "--out", str(out), *TINY, "-q"])
    assert e.value.code == 3, err.getvalue()  # the broken file fails
    return data, out


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _payload(text: str, sx: int = 0) -> dict:
    m = re.search(rf"<script type='application/json' class='zs-decide-data' id='data{sx}'>(.*?)"
                  "</script>", text, re.S)  # fmt: skip
    assert m, "no decide data in the page"
    return json.loads(m.group(1).replace("<\\/", "</"))


class _Figs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.captions: list[str] = []
        self.ext: list[str] = []
        self._cap = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._cap = tag == "figcaption"
        if tag in ("script", "link", "img", "iframe") and (a.get("src") or a.get("href")):
            ref = a.get("src") or a.get("href")
            if re.match(r"^[a-z]+:", ref) and not ref.startswith("data:"):
                self.ext.append(ref)

    def handle_data(self, data):
        if self._cap:
            self.captions.append(data.strip())
            self._cap = False


def test_report_has_the_decide_section(run):
    _data_dir, out = run
    text = (out / "report.html").read_text(encoding="utf-8")
    p = _Figs()
    p.feed(text)
    assert p.ext == [] and not re.search(r"https?://", text)  # opens from disk, no network
    ok = [r for r in _records(out) if r["status"] == "ok"]
    assert p.captions.count("original") == p.captions.count("mask") == len(ok)
    assert p.captions.count("map") == p.captions.count("overlay") == len(ok)
    assert "<svg id='hist0'" in text and "images under a good/ folder" in text
    assert "id='thr0'" in text and "id='ithr0'" in text and "id='cmd0'" in text
    assert "pixel threshold <b>0.5</b> (default)" in text
    # failures named, with the rerun hint
    assert "1 input(s) failed" in text and "bad/broken.png" in text and "--retry-errors" in text
    data = _payload(text)
    assert data["out"] == shlex.quote(str(out.resolve()))
    assert len(data["images"]) == len(ok) == len(data["pics"])
    for im in data["images"]:
        rec = next(r for r in ok if r["key"] == im["k"])
        amap = tifffile.imread(out / rec["outputs"]["map"])
        assert sum(im["hist"]) == im["N"] == amap.size
        assert (im["lo"], im["hi"]) == (float(amap.min()), float(amap.max()))
        assert im["s"] == rec["scores"]["score"]


def test_report_size_is_bounded(run):
    _d, out = run
    text = (out / "report.html").read_text(encoding="utf-8")
    data = _payload(text)
    jpegs = re.findall(r"src='data:image/jpeg;base64,([^']*)'", text)
    assert len(jpegs) == len(data["pics"])
    for im in data["images"]:
        pic = data["pics"][im["p"]]
        per_image = len(pic["map"]) + max(map(len, jpegs)) + len(json.dumps(im["hist"]))
        assert per_image <= VIEW_BYTES_MAX
    # the worst case: incompressible noise at the full view size
    rng = np.random.default_rng(0)
    v = make_view(rng.random((128, 128), np.float32), rng.random((128, 128, 3), np.float32))
    worst = len(v["map"]) + len(v["orig"]) + len(json.dumps(v["hist"], separators=(",", ":")))
    assert worst <= VIEW_BYTES_MAX
    print(f"report.html view bytes: worst case {worst} (bound {VIEW_BYTES_MAX})")


def test_rerun_after_failures_names_the_file(run, tmp_path, capsys):
    data, out = run
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    code, _, err = _cli(["anomaly", data, "--out", dst, *TINY], capsys)
    assert code == 3
    assert "failed in an earlier run (kept): bad/broken.png" in err
    assert "--retry-errors" in err and "0 ok, 1 failed" in err


def _maps_to_quantise() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    big = np.finfo(np.float32).max
    one_ulp = np.array([1.0, np.nextafter(np.float32(1.0), np.float32(2.0))], np.float32)
    tiny = np.array([0.0, 1e-45, 3e-45, 1e-44], np.float32)  # subnormals
    return [
        rng.normal(size=(50, 70)).astype(np.float32),
        np.array([-big, 0.0, big, big / 3, -big / 7], np.float32).reshape(1, 5),
        np.resize(one_ulp, (4, 6)),
        np.resize(tiny, (3, 8)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_quantisation_rule_matches_the_threshold(case):
    a = _maps_to_quantise()[case]
    codes, lo, hi = quantise(a)
    assert codes.min() == 0 and codes.max() == CODES - 1  # the extremes: the ends of the range
    step = (hi - lo) / (CODES - 1)
    assert np.abs(lo + codes * step - a).max() <= step / 2 + 1e-6
    for t in (lo - 1, lo, float(np.median(a)), hi, hi + 1):
        ct = code_threshold(lo, hi, t)
        got = int((codes >= ct).sum())
        exact = int((a >= t).sum())
        assert abs(got - exact) <= int((np.abs(a.astype(np.float64) - t) <= step / 2).sum())


@pytest.mark.parametrize("shape", [(50, 70), (1, 1), (3, 301)])
def test_view_histogram_counts_every_code_of_the_full_map(shape):
    rng = np.random.default_rng(sum(shape))
    for a in (
        rng.normal(size=shape).astype(np.float32),
        np.full(shape, 0.25, np.float32),  # one value: every pixel code 0
        np.where(rng.random(shape) < 0.2, np.nan, rng.random(shape)).astype(np.float32),
    ):
        hist = make_view(a)["hist"]
        want = np.bincount(quantise(a)[0].ravel(), minlength=CODES)
        assert hist == want.tolist() and sum(hist) == a.size


def test_multitask_rows_are_labelled(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(np.full((24, 24, 3), 100, np.uint8)).save(d / "a.png")
    out = tmp_path / "o"
    code, _, err = _cli(
        ["run", d, "--out", out, *TINY, "-q", "--task", "anomaly", "--task",
         "engine_dummy:spec,name=dummy"], capsys)  # fmt: skip
    assert code == 0, err
    text = (out / "report.html").read_text()
    assert re.search(r"<figure class='thumb'>.*?<figcaption>anomaly</figcaption>", text)
    assert re.search(r"<figure class='thumb'>.*?<figcaption>dummy</figcaption>", text)
    assert "Decide: anomaly task anomaly" in text and _payload(text)["task"] == "anomaly"


# ---- in a real browser -----------------------------------------------------------------


def _browser():
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'zsdense[dev]')")
    binary = next(
        (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            "no headless browser: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    profile = tempfile.mkdtemp(prefix="zsdense-chromium-")
    for a in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1800",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver), options=opts), profile
    except Exception as exc:  # noqa: BLE001 - a broken install is a skip with the reason
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"chromium did not start headless: {exc}")


def _page_counts(drv, n: int) -> tuple[str, dict, dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(drv, 30).until(
        lambda d: d.execute_script(
            f"return document.querySelectorAll('.card[data-small-count]').length == {n}"
        )
    )
    value = drv.execute_script("return document.getElementById('thr0').value")
    full = drv.execute_script(
        "var o={}; document.querySelectorAll('.card').forEach(function(c){"
        "o[c.querySelector('.key').textContent]=Number(c.getAttribute('data-count'));}); return o"
    )
    small = drv.execute_script(
        "var o={}; document.querySelectorAll('.card').forEach(function(c){"
        "o[c.querySelector('.key').textContent]=Number(c.getAttribute('data-small-count'));});"
        "return o"
    )
    return value, full, small


def test_slider_in_a_real_browser_counts_what_python_counts(run, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _d, src = run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    page = write_report(out)  # the copy's own page: its command names the copy
    data = _payload(page.read_text(encoding="utf-8"))
    ok = {r["key"]: r for r in _records(out) if r["status"] == "ok"}
    maps = {k: tifffile.imread(out / r["outputs"]["map"]).astype(np.float64) for k, r in ok.items()}
    views = {im["k"]: (im, data["pics"][im["p"]]) for im in data["images"]}
    drv, profile = _browser()
    try:
        drv.get(page.resolve().as_uri())
        slider = drv.find_element(By.ID, "thr0")
        cmd = drv.find_element(By.ID, "cmd0")
        n = len(views)
        checked = 0
        # move the slider with the keyboard: the start, then right in steps, then the end
        moves = [[Keys.HOME], [Keys.ARROW_RIGHT] * 300, [Keys.PAGE_UP] * 2]
        moves += [[Keys.ARROW_RIGHT] * 150, [Keys.END]]
        for keys in moves:
            slider.send_keys(*keys)
            value, full, small = _page_counts(drv, n)
            t = float(value)  # what the page computed with (it shows and uses this string)
            assert cmd.text == f"zsdense decide {data['out']} --threshold {value}"
            for key, (im, pic) in views.items():
                ct = code_threshold(im["lo"], im["hi"], t)
                # the page's counts are exactly the histogram / reduced-map rule ...
                assert full[key] == sum(im["hist"][ct:]), (key, t)
                assert small[key] == int((small_codes(pic) >= ct).sum()), (key, t)
                # ... and the full-resolution count differs from (map >= t) only by pixels
                # within half a quantisation step of t
                step = (im["hi"] - im["lo"]) / (CODES - 1)
                exact = int((maps[key] >= t).sum())
                tol = int((np.abs(maps[key] - t) <= step / 2 + 1e-12).sum())
                assert abs(full[key] - exact) <= tol, (key, t, full[key], exact, tol)
                checked += 1
        assert checked == n * len(moves)
        # the image threshold slider labels the images
        islider = drv.find_element(By.ID, "ithr0")
        islider.send_keys(Keys.HOME, *([Keys.ARROW_RIGHT] * 500))
        ivalue = drv.execute_script("return document.getElementById('ithr0').value")
        labels = drv.execute_script(
            "var o={}; document.querySelectorAll('.card').forEach(function(c){"
            "o[c.querySelector('.key').textContent]=c.querySelector('.lab').textContent;});"
            "return o"
        )
        for key, (im, _p) in views.items():
            assert labels[key] == ("anomalous" if im["s"] >= float(ivalue) else "good")
        assert cmd.text.endswith(f"--image-threshold {ivalue}")
        severe = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        command = cmd.text
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    # the command the page shows applies the chosen values
    argv = shlex.split(command)
    assert argv[:2] == ["zsdense", "decide"]
    code, _, err = _cli(argv[1:] + ["-q"], capsys)
    assert code == 0, err
    for r in _records(out):
        if r["status"] == "ok":
            assert r["scores"]["threshold"] == float(argv[argv.index("--threshold") + 1])
            assert r["scores"]["image_threshold"] == float(ivalue)


def test_ci_installs_the_browser():
    ci = Path(__file__).resolve().parents[1] / ".ci" / "run"
    if not ci.is_file():
        pytest.skip(".ci/run not next to the tests")
    text = ci.read_text()
    assert "chromium-driver" in text and "command -v apt-get" in text
    assert os.access(ci, os.X_OK)


@pytest.mark.parametrize("shape", [(150, 230, 3), (480, 640, 3), (400, 700, 4), (300, 520)])
def test_view_of_an_8_bit_picture_equals_the_view_of_its_floats(shape):
    """The engine hands ``make_view`` the context's uint8 pixels when it knows them: the same
    thumbnail bytes as from the float image they were divided into (thinned to every k-th
    pixel first for large pictures, an alpha channel or grey included)."""
    rng = np.random.default_rng(6)
    amap = rng.random(shape[:2], np.float32)
    u8 = rng.integers(0, 256, shape, dtype=np.uint8)
    assert make_view(amap, u8) == make_view(amap, u8.astype(np.float32) / np.float32(255.0))


def test_the_engine_hands_the_view_the_decoded_pixels_after_releasing_a_batch(
    tmp_path, monkeypatch, capsys
):
    """The engine drops each context's encoder outputs once its batch is computed, before the
    writes (``ImageContext.release``); the decoded uint8 pixels stay, so the report's view is
    made from them rather than converted again from the floats."""
    import zsdense.engine.units as units
    from zsdense.context import IMAGE_KEYS, ImageContext

    u8 = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    ctx = ImageContext(image=u8.astype(np.float32) / np.float32(255.0)).decoded_u8(u8)
    ctx.cache[("clip-dense", "x")] = object()
    ctx.release()
    assert set(ctx.cache) == set(IMAGE_KEYS) and ctx.known_u8 is u8

    seen = []
    real = units.store_view

    def spy(out_dir, key, task, rel, amap, image):
        seen.append(np.asarray(image).dtype)
        return real(out_dir, key, task, rel, amap, image)

    monkeypatch.setattr(units, "store_view", spy)
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.tile(u8, (6, 6, 1))).save(data / "a.png")
    rc, _, err = _cli(["anomaly", data, "--out", tmp_path / "out", *TINY, "-q"], capsys)
    assert rc == 0, err
    assert seen == [np.dtype(np.uint8)]
