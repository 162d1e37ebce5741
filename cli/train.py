"""``zsdense train-prompts``: train Crane's prompts on an annotated set, resumable.

The recipe is Crane's ``train.py`` as run (``zsdense.train``); this module only parses options,
shows progress and prints where the checkpoints went.
"""

from __future__ import annotations

import sys
import time

import click

from zsdense.cli.common import (
    REGISTER_KEYS,
    dattn_mean_option,
    make_runtime,
    option,
    out_option,
    preset_option,
    quiet_option,
    resume_option,
    runtime_options,
)
from zsdense.config import TRAIN_CACHE_MODES
from zsdense.eval.protocols import ANOMALY_LAYOUT_CHOICES
from zsdense.train.recipe import RECIPES


class _Progress:
    """A tqdm bar with the running losses on a terminal, one plain line per epoch otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.epoch = None
        self.last = 0.0

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        if ev.get("phase") == "features":
            if self.tty or ev["done"] == ev["total"]:
                click.echo(f"features: {ev['done']}/{ev['total']} images", err=True)
            return
        loss = ev["loss"]
        text = " ".join(f"{k}={v:.4f}" for k, v in loss.items())
        if self.tty:
            from tqdm import tqdm

            if self.epoch != ev["epoch"]:
                if self.bar is not None:
                    self.bar.close()
                self.bar = tqdm(
                    total=ev["batches"],
                    desc=f"epoch {ev['epoch']}/{ev['epochs']}",
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
                self.epoch = ev["epoch"]
            self.bar.set_postfix_str(text)
            self.bar.update(1)
            if ev["batch"] == ev["batches"]:
                self.bar.close()
                self.bar = None
        elif ev["batch"] == ev["batches"] or time.monotonic() - self.last > 30:
            self.last = time.monotonic()
            click.echo(
                f"epoch {ev['epoch']}/{ev['epochs']} step {ev['batch']}/{ev['batches']}: {text}",
                err=True,
            )


@click.command("train-prompts")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@out_option("Run folder: epoch_N.safetensors, best.safetensors, train.jsonl, state.")
@preset_option(
    RECIPES, "crane", "crane (E-Attn, 4 aliased block-24 maps) or crane+ (plus DINOv2 D-Attn)."
)
@option("--epochs", type=int, help="Epochs (Crane: 5).")
@option("--batch-size", type=int, help="Images per step (Crane: 8).")
@option("--lr", type=float, help="Adam learning rate (Crane: 1e-3).")
@option("--seed", type=int, help="Prompt init and data order (Crane: 111).")
@option(
    "--val", "val", multiple=True, type=click.Path(exists=True, file_okay=False),
    help="Validation set (same layouts): image and pixel AUROC after each epoch; "
    "best.safetensors follows their mean.",
)  # fmt: skip
@resume_option("Continue the run in --out where it stopped (bit for bit).")
@option("--image-size", type=int, help="Input size (Crane: 518).")
@option(
    "--cache-features", choices=TRAIN_CACHE_MODES, default="auto", show_default=True,
    help="Compute the frozen encoders' features once instead of every batch "
    "(auto: when the recipe allows; Crane+ with --dattn-mean batch does not).",
)  # fmt: skip
@option(
    "--micro-batch", type=int,
    help="Gradient accumulation: at most this many images through the text tower at "
    "once (same step, less memory).",
)  # fmt: skip
@dattn_mean_option("crane+: D-Attn mean per image (default) or over the batch (as run).")
@option(
    "--reference-dice", is_flag=True, default=False,
    help="Reproduce the reference's Dice on a final batch of one image (rows as images).",
)  # fmt: skip
@option(
    "--layout", choices=ANOMALY_LAYOUT_CHOICES, default="auto", show_default=True,
    help="Dataset layout of DATA and --val.",
)  # fmt: skip
@option(
    "--export-pth", is_flag=True, default=False,
    help="Also write best.pth in the layout Crane's train.py saves (loads in Crane).",
)  # fmt: skip
@quiet_option()
@runtime_options(exclude=("batch_size", "max_pixels", *REGISTER_KEYS))
def train_prompts_cmd(
    data,
    out_dir,
    preset,
    epochs,
    batch_size,
    lr,
    seed,
    val,
    resume,
    image_size,
    cache_features,
    micro_batch,
    dattn_mean,
    reference_dice,
    layout,
    export_pth,
    quiet,
    **runtime,
) -> None:
    """Train Crane's learned prompts on DATA (MVTec, VisA, or a folder: good/ + one folder per
    defect + masks/) exactly as Crane's train.py runs it; use the result with
    `zsdense anomaly --prompts RUN_DIR/best.safetensors`."""
    from pathlib import Path

    from zsdense.train.checkpoint import LOG_FILE, export_published
    from zsdense.train.loop import BEST_FILE, PromptTrainer, TrainOptions
    from zsdense.train.recipe import get_recipe

    recipe = get_recipe(
        preset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        image_size=image_size,
        dattn_mean=dattn_mean,
        dice_squeeze_rows=True if reference_dice else None,
    )
    if runtime.get("precision") == "auto":
        runtime["precision"] = "fp32"  # the recipe as Crane runs it; bf16 only when asked for
    rt = make_runtime(**runtime)
    options = TrainOptions(
        cache_features=cache_features,
        micro_batch=micro_batch,
        layout=layout,
        val=tuple(val),
    )
    if rt.random_weights and not quiet:
        click.echo(
            f"zsdense: models='{rt.config.models}' uses random weights: the prompts are NOT "
            "meaningful",
            err=True,
        )
    trainer = PromptTrainer(list(data), out_dir, recipe, options, resume=resume, runtime=rt)
    if not quiet:
        c = trainer.counts
        click.echo(
            f"training {preset} prompts on {c['images']} images ({c['anomalous']} anomalous, "
            f"{c['normal']} normal), {recipe.epochs} epochs, batch {recipe.batch_size}, "
            f"features {'cached' if trainer.use_cache else 'recomputed each batch'}"
            + (f", resuming after epoch {trainer.start_epoch}" if resume else ""),
            err=True,
        )
    history = trainer.run(progress=_Progress(quiet))
    out = Path(out_dir)
    if export_pth and (out / BEST_FILE).is_file():
        export_published(out / BEST_FILE, out / "best.pth")
    if history:
        last = history[-1]
        msg = f"epoch {last['epoch']}: loss {last['loss']['total']:.4f}"
        if last.get("val"):
            msg += ", val " + ", ".join(f"{k} {v}" for k, v in last["val"].items())
        click.echo(msg)
    click.echo(
        f"checkpoints: {out / BEST_FILE} (best epoch "
        f"{history[-1]['best_epoch'] if history else '-'}), log: {out / LOG_FILE}"
    )
