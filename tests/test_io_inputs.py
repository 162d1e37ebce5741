"""Input listing: files, folders, globs, hidden files, duplicates, mirroring, stem collisions."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from zsdense.errors import InputError
from zsdense.io.inputs import InputItem, list_inputs, strip_extension
from zsdense.io.manifest import WorkItem, out_stem


def _touch(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    for rel in (
        "b.png",
        "a.JPG",
        "sub/c.tif",
        "sub/deeper/d.nii.gz",
        "sub/e.dcm",
        "notes.txt",
        ".hidden.png",
        ".cache/f.png",
        "sub/.g.png",
    ):
        _touch(d / rel)
    _touch(d / "sub" / "IM0001", b"\x00" * 128 + b"DICM" + b"\x00" * 10)  # bare DICOM name
    _touch(d / "sub" / "README", b"just text")
    return d


def test_folder_recursed_sorted_filtered(tree: Path) -> None:
    items = list_inputs([tree])
    rels = [str(i.rel) for i in items]
    assert rels == ["a.JPG", "b.png", "sub/IM0001", "sub/c.tif", "sub/deeper/d.nii.gz", "sub/e.dcm"]
    assert all(i.path.is_file() for i in items)
    assert items[1].path == tree / "b.png"


def test_explicit_file_always_included(tree: Path) -> None:
    items = list_inputs([tree / "notes.txt", tree / ".hidden.png"])
    assert [str(i.rel) for i in items] == ["notes.txt", ".hidden.png"]


def test_glob_patterns_and_rel_to_root(tree: Path) -> None:
    items = list_inputs([str(tree / "**" / "*.tif"), str(tree / "*.png")])
    assert [str(i.rel) for i in items] == ["sub/c.tif", "b.png"]
    items = list_inputs([str(tree / "su?")])  # a glob matching a folder walks it
    assert "sub/deeper/d.nii.gz" in [str(i.rel) for i in items]
    items = list_inputs([str(tree / "*")])  # non-images filtered out of glob matches
    assert "notes.txt" not in [str(i.rel) for i in items]
    assert not any(".cache" in str(i.rel) or ".hidden" in str(i.rel) for i in items)


def test_duplicates_removed(tree: Path) -> None:
    items = list_inputs([tree / "b.png", tree, str(tree / "*.png")])
    paths = [i.path.resolve() for i in items]
    assert len(paths) == len(set(paths)) == 6
    assert items[0].rel == PurePosixPath("b.png")


def test_nothing_matched_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder") as ei:
        list_inputs([tmp_path / "nope.png"])
    assert "nope.png" in str(ei.value)
    with pytest.raises(InputError, match="no supported image files match"):
        list_inputs([str(tmp_path / "*.png")])
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "empty" / "x.txt")
    with pytest.raises(InputError, match="folder contains no supported image files"):
        list_inputs([tmp_path / "empty"])


def output_stem(out, item: InputItem, suffix: str = "") -> Path:
    """The engine's output stem of a listed input (the one implementation, io.manifest)."""
    return out_stem(Path(out), WorkItem(str(item.rel), item.path, item.rel, stem=item.stem), suffix)


def test_output_stem_mirrors_tree(tree: Path, tmp_path: Path) -> None:
    items = {str(i.rel): i for i in list_inputs([tree])}
    out = tmp_path / "out"
    assert output_stem(out, items["sub/c.tif"]) == out / "sub" / "c"
    assert output_stem(out, items["sub/deeper/d.nii.gz"], ".s012") == out / "sub/deeper/d.s012"
    assert output_stem(out, items["sub/e.dcm"], ".f003") == out / "sub" / "e.f003"
    assert output_stem(out, items["sub/IM0001"]) == out / "sub" / "IM0001"
    direct = InputItem(Path("/x/y/img.v2.png"), PurePosixPath("img.v2.png"))
    assert output_stem(out, direct) == out / "img.v2"
    assert strip_extension(PurePosixPath("a/b.NII.GZ")) == PurePosixPath("a/b")


def test_stem_collisions_get_distinct_outputs(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "x.png")
    _touch(tmp_path / "b" / "x.png")
    _touch(tmp_path / "c" / "x.png")
    _touch(tmp_path / "c" / "x.jpg")
    items = list_inputs([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c"])
    stems = [output_stem("o", i) for i in items]
    assert len(set(stems)) == len(items) == 4
    assert stems[0] == Path("o/x") and stems[1] == Path("o/x.png")
    assert all(str(i.rel).endswith((".png", ".jpg")) for i in items)


def test_bundled_assets_list_and_read() -> None:
    from zsdense.io.readers import read_image_records

    assets = Path(__file__).resolve().parents[1] / "assets"
    if not assets.is_dir():
        pytest.skip(f"assets folder not found at {assets}")
    items = list_inputs([assets / "inspection", assets / "scenes", assets / "medical"])
    names = {i.path.name for i in items}
    assert {
        "brick.png",
        "grass.png",
        "gravel.png",
        "gravel_scratch.png",
        "coffee.png",
        "chelsea.png",
        "CT_small.dcm",
    } <= names
    total = sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    assert total < 1_000_000
    for item in items:
        if item.path.suffix == ".dcm":
            pytest.importorskip("pydicom")
        recs = read_image_records(item.path)
        assert recs[0].image.shape[2] == 3 and max(recs[0].image.shape[:2]) <= 512


# ---- every path accounted for: skipped paths with a reason, excluded folders -------------------


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    """A folder with images, hidden things, unsupported and extension-less files, links."""
    d = tmp_path / "corpus"
    for rel in ("a.png", "anim.gif", "pic.webp", "sub/b.jpg", "notes.txt", "sub/data.CSV"):
        _touch(d / rel)
    for rel in (".DS_Store", "sub/.hidden.png", ".git/config", ".git/objects/x.png"):
        _touch(d / rel)
    _touch(d / "README", b"plain text, no extension")
    _touch(d / "sub" / "IM0002", b"\x00" * 128 + b"DICM" + b"\x00" * 10)
    (d / "dangling.png").symlink_to(d / "missing-target.png")
    (d / "linked").symlink_to(d / "sub", target_is_directory=True)
    return d


def _reasons(listed) -> dict[str, str]:
    return {str(s.rel): s.reason for s in listed.skipped}


def test_every_path_is_listed_or_skipped_with_a_reason(corpus: Path) -> None:
    listed = list_inputs([corpus])
    assert [str(i.rel) for i in listed] == [
        "a.png",
        "anim.gif",
        "pic.webp",
        "sub/IM0002",
        "sub/b.jpg",
    ]
    assert _reasons(listed) == {
        ".DS_Store": "hidden file (name starts with '.')",
        ".git": "hidden folder (name starts with '.'), not searched",
        "README": "no file extension and not a DICOM file",
        "dangling.png": "not a regular file (broken link, device, pipe or socket)",
        "linked": "link to a folder, not followed",
        "notes.txt": "unsupported file type '.txt'",
        "sub/.hidden.png": "hidden file (name starts with '.')",
        "sub/data.CSV": "unsupported file type '.csv'",
    }
    assert [str(s.rel) for s in listed.skipped] == sorted(_reasons(listed))  # listing order
    assert listed.skipped[0].message == "skipped: hidden file (name starts with '.')"
    assert listed.excluded == []
    # every entry of the tree (hidden folders counted once) is an item or a skipped path
    top = {str(PurePosixPath(p.relative_to(corpus).as_posix())) for p in corpus.iterdir()}
    top |= {f"sub/{p.name}" for p in (corpus / "sub").iterdir()}
    top -= {"sub"}
    assert top == {str(i.rel) for i in listed} | set(_reasons(listed))


def test_listed_inputs_is_the_old_list(corpus: Path) -> None:
    listed = list_inputs([corpus])
    assert isinstance(listed, list) and len(listed) == 5
    assert listed == list(listed) and listed[0].rel == PurePosixPath("a.png")
    assert not list_inputs([corpus / "a.png"]).skipped


def test_skipped_path_named_directly_is_processed_not_skipped(corpus: Path) -> None:
    listed = list_inputs([corpus, corpus / "notes.txt", str(corpus / "*")])
    assert "notes.txt" in [str(i.rel) for i in listed]
    assert "notes.txt" not in _reasons(listed)
    assert len([s for s in listed.skipped if s.rel == PurePosixPath("README")]) == 1


def test_glob_reports_what_it_matched_but_will_not_read(corpus: Path) -> None:
    listed = list_inputs([str(corpus / "*")])
    assert "notes.txt" in _reasons(listed) and "README" in _reasons(listed)
    assert "a.png" in [str(i.rel) for i in listed]
    with pytest.raises(InputError, match=r"no supported image files match.*1 other path"):
        list_inputs([str(corpus / "*.txt")])


def _with_outputs(tmp_path: Path) -> Path:
    """DATA holding one image and a previous run's output folder inside it."""
    data = tmp_path / "nest"
    _touch(data / "chelsea.png")
    _touch(data / "res" / "chelsea.mask.png")
    _touch(data / "res" / "results.jsonl")
    _touch(data / "res" / "sub" / "deep.overlay.jpg")
    return data


def test_exclude_keeps_the_output_folder_out_and_says_so(tmp_path: Path, monkeypatch) -> None:
    data = _with_outputs(tmp_path)
    assert "res/chelsea.mask.png" in [str(i.rel) for i in list_inputs([data])]
    monkeypatch.chdir(tmp_path)
    for out in (Path("nest/res"), data / "res", "nest/./res/"):
        listed = list_inputs(["nest"], exclude=[out])
        assert [str(i.rel) for i in listed] == ["chelsea.png"]
        assert listed.excluded == [Path(out)] and listed.skipped == []
    listed = list_inputs([str(data / "**" / "*.*")], exclude=[data / "res"])
    assert [str(i.rel) for i in listed] == ["chelsea.png"]
    assert listed.excluded == [data / "res"]
    # a hidden output folder is excluded, not reported as skipped
    (data / "res").rename(data / ".res")
    listed = list_inputs([data], exclude=[data / ".res"])
    assert listed.skipped == [] and listed.excluded == [data / ".res"]


def test_exclude_not_hit_named_files_and_roots_inside_it(tmp_path: Path) -> None:
    data = _with_outputs(tmp_path)
    listed = list_inputs([data / "chelsea.png"], exclude=[data / "res"])
    assert len(listed) == 1 and listed.excluded == []
    listed = list_inputs([data / "res" / "chelsea.mask.png"], exclude=[data / "res"])
    assert len(listed) == 1  # named directly: always included
    listed = list_inputs([data / "res" / "sub"], exclude=[data / "res"])
    assert [str(i.rel) for i in listed] == ["deep.overlay.jpg"]  # pointed inside on purpose
    assert listed.excluded == []
    listed = list_inputs([data], exclude=[tmp_path / "elsewhere"])  # need not exist
    assert len(listed) == 3 and listed.excluded == []
    assert _reasons(listed) == {"res/results.jsonl": "unsupported file type '.jsonl'"}


def test_data_that_is_the_excluded_folder_is_an_error(tmp_path: Path) -> None:
    data = _with_outputs(tmp_path)
    with pytest.raises(InputError, match=r"no supported image files.*excluded: .*res"):
        list_inputs([data / "res"], exclude=[data / "res"])
