"""``zsdense export coco OUT``: a run's masks as COCO instances (for detectors, CVAT, FiftyOne)."""

from __future__ import annotations

import json

import click


@click.group("export")
def export_group() -> None:
    """Export a run's results to other formats (COCO instances)."""


@export_group.command("coco")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--to", "to_path", type=click.Path(dir_okay=False),
    help="The file to write (default OUT/instances_coco.json, or "
    "OUT/instances_coco.<task>.json per task of a multi-task run).",
)  # fmt: skip
@click.option("--task", "task_name", help="Export only this task of the run.")
@click.option(
    "--skip-class", "skip", multiple=True,
    help="Open-vocabulary: leave out the regions of this class (e.g. background). Repeatable.",
)  # fmt: skip
@click.option("--json", "json_summary", is_flag=True, help="Print a JSON summary on stdout.")
def coco_cmd(out_dir, to_path, task_name, skip, json_summary) -> None:
    """Write the instances of the run in OUT as COCO JSON (RLE masks, boxes, areas, scores):
    anomaly defects (connected components of the masks), open-vocabulary regions per class,
    referring masks (one per query, with its text). Made from the masks on disk, so it follows
    `zsdense decide`. pycocotools reads it with COCO(path).
    """
    from zsdense.engine.coco import export_coco

    paths = export_coco(out_dir, to=to_path, task=task_name, skip=skip)
    counts = {}
    for p in paths:
        data = json.loads(p.read_text(encoding="utf-8"))
        counts[str(p)] = {"images": len(data["images"]), "annotations": len(data["annotations"])}
        click.echo(
            f"zsdense: {p}: {len(data['images'])} image(s), {len(data['annotations'])} "
            f"instance(s), {len(data['categories'])} categor(y/ies)",
            err=True,
        )
    if json_summary:
        click.echo(json.dumps({"command": "export coco", "files": counts}, indent=1))
