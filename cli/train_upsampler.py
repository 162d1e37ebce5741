"""``zsdense train-upsampler``: train a JAFAR feature upsampler on unlabelled images, resumable.

The step is the authors' ``train.py`` as run (``zsdense.train.jafar``); this module parses
options, shows progress, turns Ctrl-C into a clean stop (the step in progress finishes and is
saved; a second Ctrl-C stops at once) and prints where the files went.
"""

from __future__ import annotations

import signal
import sys
import time

import click

from zsdense.cli.common import (
    REGISTER_KEYS,
    make_runtime,
    out_option,
    quiet_option,
    resume_option,
    runtime_options,
)


class _Progress:
    """A tqdm bar over the steps on a terminal; plain lines (every 30 s and at each validation)
    otherwise."""

    def __init__(self, quiet: bool, start: int, total: int) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.last = 0.0
        if not quiet and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        if ev["phase"] == "val":
            v = ev["val"]
            if "ratio" in v:
                msg = (
                    f"step {ev['step']}: held-out loss JAFAR {v['jafar']:.4f}, bilinear "
                    f"{v['bilinear']:.4f} (ratio {v['ratio']:.3f})"
                )
                if self.bar is not None:
                    self.bar.write(msg, file=sys.stderr)
                else:
                    click.echo(msg, err=True)
            return
        text = f"loss={ev['loss']:.4f} hr={ev['hr']:.4f} reg={ev['reg']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif time.monotonic() - self.last > 30 or ev["step"] == ev["steps"]:
            self.last = time.monotonic()
            click.echo(f"step {ev['step']}/{ev['steps']}: {text}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command("train-upsampler")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--backbone",
    required=True,
    help="The encoder whose features to upsample: a DINOv2 (dinov2-small, dinov2-reg-base, "
    "...) or a CLIP (clip-ViT-B-16-openai or ViT-B-16, ...).",
)
@out_option("Run folder: state.safetensors (resume), upsampler.safetensors, train.jsonl, run.json.")
@resume_option("Continue the run in --out from its last saved step (bit for bit); same options.")
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the final upsampler to FILE: .pth = the authors' released layout "
    "{'jafar': state_dict}; .safetensors = with its backbone recorded.",
)
@click.option("--steps", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option(
    "--img-size",
    type=click.IntRange(min=2),
    default=448,
    show_default=True,
    help="Training images are resized (shorter side) and centre-cropped to this (a multiple "
    "of the patch size).",
)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="AdamW learning rate.")
@click.option("--qk-dim", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--uhr-size",
    type=click.IntRange(min=1),
    default=224,
    show_default=True,
    help="Output size of the regulariser term (train.py: 224, whatever --img-size).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Init, data order, draws.")
@click.option(
    "--val",
    "val",
    multiple=True,
    type=click.Path(exists=True),
    help="Held-out images for validation (default: a share of DATA, see --val-images).",
)
@click.option(
    "--val-images",
    type=click.IntRange(min=0),
    default=None,
    help="Images of DATA held out for validation (default 5 %, 1 to 64).",
)
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--val-every", type=click.IntRange(min=1), default=500, show_default=True)
@quiet_option()
@runtime_options(exclude=REGISTER_KEYS)  # trains on the plain backbone
def train_upsampler_cmd(
    data,
    backbone,
    out_dir,
    resume,
    export_path,
    steps,
    img_size,
    lr,
    qk_dim,
    heads,
    uhr_size,
    seed,
    val,
    val_images,
    save_every,
    val_every,
    quiet,
    batch_size,
    **runtime,
) -> None:
    """Train a JAFAR upsampler for the encoder --backbone on the images in DATA (any folder the
    readers accept; no labels), as the authors' train.py does. RUN/upsampler.safetensors
    records its backbone; use it with `zsdense anomaly|openvocab ... --upsampler
    jafar:RUN/upsampler.safetensors` (refused by any other encoder; --export FILE.pth writes the
    authors' released layout).

    Validation reports the held-out loss of JAFAR against plain bilinear upsampling of the same
    low-resolution features (ratio < 1: JAFAR is better). Ctrl-C finishes the current step,
    saves it and exits (130); rerun with --resume to continue.

    --precision auto trains in float32 on the CPU and under bf16 autocast on CUDA (as the
    authors)."""
    from zsdense.train.jafar import JafarRecipe, UpsamplerOptions, UpsamplerTrainer

    rt = _make_training_runtime(batch_size, runtime)
    recipe = JafarRecipe(
        img_size=img_size,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        qk_dim=qk_dim,
        num_heads=heads,
        uhr_size=uhr_size,
        seed=seed,
        val_images=val_images,
    )
    options = UpsamplerOptions(val=tuple(val), save_every=save_every, val_every=val_every)
    if rt.random_weights and not quiet:
        click.echo(
            f"zsdense: models='{rt.config.models}' uses random weights: the upsampler is NOT "
            "meaningful",
            err=True,
        )
    trainer = UpsamplerTrainer(
        list(data), out_dir, backbone, recipe, options, resume=resume, runtime=rt
    )
    if not quiet:
        click.echo(
            f"training a JAFAR upsampler for {trainer.backbone_id} on "
            f"{len(trainer.train_items)} images ({len(trainer.val_items)} held out), "
            f"{recipe.steps} steps, batch {recipe.batch_size}, {recipe.img_size} px, "
            f"{trainer.precision}" + (f", resuming after step {trainer.step}" if resume else ""),
            err=True,
        )
    history, stop_asked = _train_until_done_or_stopped(trainer, quiet, recipe.steps)
    _print_outcome(trainer, history, out_dir, export_path)
    if stop_asked and trainer.step < recipe.steps:
        click.echo(f"interrupted at step {trainer.step}: rerun with --resume to continue", err=True)
        sys.exit(130)


def _make_training_runtime(batch_size, runtime: dict):
    """The runtime to train with: ``--precision auto`` is float32 on the CPU and bf16 on CUDA
    (as the authors train)."""
    from zsdense.runtime import resolve_device

    if runtime.get("precision") == "auto":
        cuda = resolve_device(runtime.get("device", "auto")).type == "cuda"
        runtime["precision"] = "bf16" if cuda else "fp32"
    return make_runtime(batch_size=batch_size, **runtime)


def _train_until_done_or_stopped(trainer, quiet: bool, total: int) -> tuple[list, bool]:
    """Run the trainer with progress; the first Ctrl-C lets the step in progress finish and be
    saved, a second one stops at once. Returns (the history, whether a stop was asked)."""
    stop = {"asked": False}

    def on_sigint(signum, frame):  # noqa: ARG001 - signal handler signature
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        click.echo("\nstopping after this step (Ctrl-C again to stop now)", err=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    bar = _Progress(quiet, trainer.step, total)
    try:
        history = trainer.run(progress=bar, should_stop=lambda: stop["asked"])
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old)
    return history, stop["asked"]


def _print_outcome(trainer, history: list, out_dir, export_path) -> None:
    """Export if asked, then print the last held-out comparison and where the files went."""
    from pathlib import Path

    from zsdense.train.checkpoint import LOG_FILE
    from zsdense.train.jafar import UPSAMPLER_FILE

    out = Path(out_dir)
    if export_path:
        trainer.export(export_path)
        click.echo(f"exported: {export_path}")
    last = next((h for h in reversed(history) if "ratio" in h.get("val", {})), None)
    if last is not None:
        v = last["val"]
        click.echo(
            f"step {last['step']}: held-out loss JAFAR {v['jafar']:.4f} vs bilinear "
            f"{v['bilinear']:.4f} (ratio {v['ratio']:.3f})"
        )
    click.echo(f"upsampler: {out / UPSAMPLER_FILE} (step {trainer.step}), log: {out / LOG_FILE}")
