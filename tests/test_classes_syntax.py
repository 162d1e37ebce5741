"""One meaning per separator: ``,`` between classes, ``;`` between synonyms of one class, in
``--classes``, the Python ``classes=`` string, the ``zsdense run`` TOML and ``--task`` (whose
options are comma-separated, so its list items are separated by ``|``). An empty class is an
error naming its position: dropping it would shift the label index of every later class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsdense.engine.specs import parse_task_option, tasks_from_mapping
from zsdense.errors import ConfigError
from zsdense.options import OpenVocabOptions, options_for
from zsdense.text.classifier import parse_classes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WANT = (("cat", ("cat", "kitten")), ("sofa", ("sofa",)))


def _task_classes(cfg: dict):
    return options_for(cfg.pop("task"), cfg).classes


def _task_options(value: str):
    cfg = parse_task_option(value)
    return options_for(cfg.pop("task"), cfg)


def test_every_syntax_gives_the_same_classes():
    assert OpenVocabOptions.from_mapping(classes="cat; kitten, sofa").classes == WANT
    assert OpenVocabOptions.from_mapping(classes=["cat; kitten", "sofa"]).classes == WANT
    assert OpenVocabOptions.from_mapping(classes=[["cat", "kitten"], "sofa"]).classes == WANT
    assert _task_classes(parse_task_option("openvocab,classes=cat;kitten|sofa")) == WANT
    tasks, _ = tasks_from_mapping({"openvocab": {"classes": ["cat;kitten", "sofa"]}})
    assert _task_classes(tasks[0]) == WANT
    tasks, _ = tasks_from_mapping({"openvocab": {"classes": "cat;kitten, sofa"}})
    assert _task_classes(tasks[0]) == WANT
    # ';' alone never separates classes: one class with two synonyms, wherever it is written
    one = (("cat", ("cat", "kitten")),)
    assert OpenVocabOptions.from_mapping(classes="cat;kitten").classes == one
    assert _task_classes(parse_task_option("openvocab,classes=cat;kitten")) == one


@pytest.mark.parametrize(
    "spec,pos,n",
    [
        ("cat,,cup", 2, 3),
        ("cat, ,cup", 2, 3),
        (",cat", 1, 2),
        ("cat, sofa,", 3, 3),
        ("cat, ;, cup", 2, 3),
        (["cat", "", "cup"], 2, 3),
        (["cat", "cup", "bg:"], 3, 3),
    ],
)
def test_an_empty_class_is_an_error_naming_its_position(spec, pos, n):
    with pytest.raises(ConfigError, match=f"class {pos} of {n} .*empty.*label index"):
        parse_classes(spec)


def test_empty_classes_through_the_faces(tmp_path, capsys):
    with pytest.raises(ConfigError, match="class 2 of 3"):
        OpenVocabOptions.from_mapping(classes="cat,,cup")
    with pytest.raises(ConfigError, match="class 2 of 3"):
        _task_classes(parse_task_option("openvocab,classes=cat||cup"))
    from zsdense.cli.main import main

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    for args in (
        ["openvocab", img, "--classes", "cat,,cup"],
        ["run", img, "--task", "openvocab", "--classes", "cat,,cup"],
        ["run", img, "--task", "openvocab,classes=cat||cup"],
    ):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args] + ["--out", str(tmp_path / "o"), "--models", "tiny"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "class 2 of 3" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_task_values_take_their_field_types():
    o = _task_options("anomaly,threshold=0.4,eattn_layers=6|12")
    assert o.threshold == 0.4 and o.config().eattn_layers == (6, 12)
    c = _task_options("openvocab:sclip,classes=a|b,prob_thd=0.3,short_side=64").config()
    assert c.prob_thd == 0.3 and c.short_side == 64 and isinstance(c.short_side, int)
    r = _task_options("refer,refine=true,k1=2,text=12").config()
    assert r.refine is True and r.k1 == 2
    assert options_for("refer", {"text": "12"}).text == "12"  # text stays text


def test_run_task_classes_run_and_hint(tmp_path, capsys):
    """``--task "openvocab,classes=cat;kitten|sofa"`` runs two classes; a lone ';' list gets a
    note that it is one class with synonyms."""
    from zsdense.cli.main import main

    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray((np.random.RandomState(0).rand(24, 32, 3) * 255).astype(np.uint8)).save(
        d / "a.png"
    )
    out = tmp_path / "o"
    task = "openvocab:sclip,classes=cat;kitten|sofa,short_side=64"
    with pytest.raises(SystemExit) as exc:
        main(["run", str(d), "--task", task, "--out", str(out), "--models", "tiny", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    (rec,) = [json.loads(x) for x in Path(out / "results.jsonl").read_text().splitlines()]
    assert rec["meta"]["result"]["class_names"] == ["cat", "sofa"]
    assert "note" not in err
    with pytest.raises(SystemExit):
        main(["run", str(d), "--task", "openvocab:sclip,classes=cat;sofa", "--out", str(out)])
    err = capsys.readouterr().err
    assert "one class with synonyms" in err and "'|'" in err
