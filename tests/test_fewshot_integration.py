"""Few-shot presets through every face: ``zsdense anomaly --reference``, a memory bank,
``zsdense run`` and ``Segmenter.anomaly(reference=...)`` (tiny models, bundled textures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from zsdense.errors import ConfigError
from zsdense.options import AnomalyOptions

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "inspection"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    (root / "good").mkdir()
    (root / "test").mkdir()
    shutil.copy(ASSETS / "gravel.png", root / "good" / "g1.png")
    shutil.copy(ASSETS / "brick.png", root / "good" / "g2.png")
    shutil.copy(ASSETS / "gravel_scratch.png", root / "test" / "scratch.png")
    shutil.copy(ASSETS / "grass.png", root / "test" / "grass.png")
    return root


def _main(args, capsys) -> tuple[int, str]:
    from zsdense.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return int(exc.value.code or 0), cap.out + cap.err


def _scores(out: Path) -> dict[str, float]:
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in recs), recs
    return {r["key"]: r["scores"]["score"] for r in recs}


def test_options_need_a_reference_for_few_shot_presets():
    # what --reference a preset takes is its scorer's declaration, checked when options run
    from zsdense.tasks.anomaly_methods import check_options

    with pytest.raises(ConfigError, match="--reference"):
        check_options(AnomalyOptions.from_mapping(preset="anomalydino"))
    with pytest.raises(ConfigError, match="few-shot preset"):
        check_options(AnomalyOptions.from_mapping(preset="crane", reference="good/"))
    with pytest.raises(ConfigError, match="shots"):
        AnomalyOptions.from_mapping(preset="anomalydino", reference="good/", shots=0)


def test_cli_images_and_bank_give_the_same_scores(parts, tmp_path, capsys):
    common = ["--models", "tiny", "-q", "--no-overlay", "--preset", "anomalydino"]
    code, text = _main(
        ["anomaly", parts / "test", "--out", tmp_path / "a", "--reference", parts / "good"]
        + common,
        capsys,
    )
    assert code == 0, text
    bank = tmp_path / "bank.zsdmem"
    code, text = _main(
        ["memory", "build", parts / "good", "--out", bank, "--models", "tiny"], capsys
    )
    assert code == 0 and bank.is_file(), text
    code, text = _main(
        ["anomaly", parts / "test", "--out", tmp_path / "b", "--reference", bank] + common, capsys
    )
    assert code == 0, text
    a, b = _scores(tmp_path / "a"), _scores(tmp_path / "b")
    assert a.keys() == b.keys() == {"scratch.png", "grass.png"}
    assert a == pytest.approx(b, rel=1e-6)
    recs = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert {r["scores"]["threshold_source"] for r in recs} == {"references"}


def test_crane_fewshot_through_the_cli_and_run(parts, tmp_path, capsys):
    code, text = _main(
        ["anomaly", parts / "test", "--out", tmp_path / "c", "--preset", "crane+fewshot"]
        + ["--reference", parts / "good", "--models", "tiny", "-q"],
        capsys,
    )
    assert code == 0, text
    code, text = _main(
        ["run", parts / "test", "--out", tmp_path / "r", "--models", "tiny", "-q"]
        + ["--task", f"anomaly:crane+fewshot,reference={parts / 'good'}"],
        capsys,
    )
    assert code == 0, text
    assert _scores(tmp_path / "c") == pytest.approx(_scores(tmp_path / "r"), rel=1e-6)


def test_python_reference_and_shots(parts):
    from zsdense import Segmenter

    seg = Segmenter(models="tiny")
    img = str(parts / "test" / "scratch.png")
    r2 = seg.anomaly(img, preset="anomalydino", reference=str(parts / "good"))
    r1 = seg.anomaly(img, preset="anomalydino", reference=str(parts / "good"), shots=1)
    assert r2.anomaly_map.shape == r1.anomaly_map.shape == (256, 256)
    # one reference fewer can only move each patch's nearest neighbour farther away
    assert np.all(r1.anomaly_map >= r2.anomaly_map - 1e-5)
    assert not np.allclose(r1.anomaly_map, r2.anomaly_map)
