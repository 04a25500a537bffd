"""A run's model written where `backbone.init_from` reads it: the pretrain -> fine-tune hand-over.

`train.save_pretrained` makes a run (typically a single-view image prior: `data.num_views = 1`,
`data.num_ref = 0`) write, at every checkpoint and at the end, the weights evaluation uses (the
EMA's when kept) as the backbone's `save_pretrained` folder, which keeps everything (config,
camera path, q/k norms). `train.pretrained_layouts` adds the foreign layouts of
`backbones.export_layouts` inside that folder (`dit.pt` for mv_dit, `sd_unet/` for mv_unet): a
multi-view run initialised from one of those starts with fresh multi-view parts (camera path
zero, as CAT3D starts from SD), which needs a prior that never used its cameras:
`train.camera_inert` zeroes the camera path at build time and keeps it there.

The folder is replaced atomically (written beside it, then renamed over it), so a run killed
while writing leaves the previous folder, never a half-written one; it changes no random state,
so a run that writes it trains exactly as one that does not.
"""
from __future__ import annotations

import pathlib
import shutil

from backbones import export_layouts
from cameo_bench.engine import distributed

FOLDER = "pretrained"  # inside the run folder, unless train.pretrained_dir says otherwise


class PretrainedError(ValueError):
    """A run asked to write a layout its model cannot be written in (found before the first step)."""


def pretrained_dir(run) -> pathlib.Path:
    """Where `train.save_pretrained` writes: `train.pretrained_dir`, else `<run_dir>/pretrained`."""
    return pathlib.Path(run.exp.train.pretrained_dir or run.run_dir / FOLDER)


def make_camera_inert(model) -> None:
    """`train.camera_inert`: the camera path zero now and frozen there (before the EMA copies it)."""
    export_layouts.zero_camera_path(model)
    export_layouts.freeze_camera_path(model)


def check(run) -> None:
    """Fail before training when a requested layout cannot hold this model (the reason named)."""
    t = run.exp.train
    for layout in t.pretrained_layouts if t.save_pretrained else ():
        try:
            export_layouts.check_exportable(run.eval_model, layout)
        except export_layouts.NotExportableError as err:
            hint = " (set train.camera_inert = True)" if "camera path" in str(err) and not t.camera_inert else ""
            raise PretrainedError(f"train.pretrained_layouts = {list(t.pretrained_layouts)}: {err}{hint}") from None


def save(run) -> pathlib.Path | None:
    """Rank 0 writes the folder (every rank calls; the others wait). Returns it on rank 0."""
    if not run.exp.train.save_pretrained:
        return None
    target = None
    if run.dist.is_main:
        target = pretrained_dir(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        fresh, old = target.with_name(f".{target.name}.new"), target.with_name(f".{target.name}.old")
        for leftover in (fresh, old):
            shutil.rmtree(leftover, ignore_errors=True)
        model = run.eval_model
        model.save_pretrained(fresh)
        for layout in run.exp.train.pretrained_layouts:
            export_layouts.export(model, fresh, layout)
        if target.exists():
            target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return target
