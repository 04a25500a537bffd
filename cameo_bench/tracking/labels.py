"""Run labels a person can read: `mv_dit tiny | baseline`, `mv_dit tiny | CAMEO λ=0.5 @ blocks.02.attn`.

Built from a run's flattened params (`section.field -> str`, as trackers store them), so the same
label comes out of a parsed experiment, an MLflow run or a run folder. Whether a run is a baseline
is decided by the one rule, `cameo_bench.config.spec.is_baseline`, after parsing the param strings
here. Pure strings: no mlflow, no torch.
"""
from __future__ import annotations

from collections.abc import Mapping

from cameo_bench.config.spec import is_baseline
from cameo_bench.tracking import keys


def cameo_weight_and_source(params: Mapping[str, str]) -> tuple[float, str]:
    """`(cameo.weight, cameo.source)` parsed from param strings; a run that logged no weight ran
    without CAMEO (the spec's default weight is 0)."""
    text = params.get(keys.CAMEO_WEIGHT, "0")
    try:
        weight = float(text)
    except ValueError as err:
        raise ValueError(f"param {keys.CAMEO_WEIGHT} = {text!r} is not a number") from err
    return weight, params.get(keys.CAMEO_SOURCE, "")


def params_are_baseline(params: Mapping[str, str]) -> bool:
    return is_baseline(*cameo_weight_and_source(params))


def run_label(params: Mapping[str, str], layer: str | None = None) -> str:
    """`<backbone> <preset> | baseline` or `<backbone> <preset> | CAMEO λ=<weight> @ <layer>`.

    `layer` is the resolved supervised layer; without it, the run's `cameo.layer_resolved` tag or
    param, else its `cameo.layer` (which may be a selector such as `depth:0.5`). A baseline names no
    layer: it supervises none.
    """
    backbone = f"{params.get(keys.BACKBONE_NAME, '?')} {params.get(keys.BACKBONE_PRESET, '?')}"
    weight, source = cameo_weight_and_source(params)
    if is_baseline(weight, source):
        return f"{backbone} | baseline"
    resolved = params.get(keys.LAYER_RESOLVED)
    layer = layer or (resolved if resolved not in (None, "", "none") else None) or params.get(keys.CAMEO_LAYER, "?")
    return f"{backbone} | CAMEO λ={weight:g} @ {layer}"
