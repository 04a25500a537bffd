"""Run labels and tags a person can read: `mv_dit tiny · CAMEO λ0.5 @blocks.02.attn · s0`, `mv_dit tiny · baseline · s0`.

`run_label` is THE name of a run: its MLflow run name, its row in the quickstart's summary table and
its label in reports. It is read in a truncated column, so the parts go from what tells runs apart
most (backbone, arm) to least (seed), and a baseline names no layer: it supervises none.

Everything here is built from a run's flattened params (`section.field -> str`, as trackers store
them), so the same label comes out of a parsed experiment, an MLflow run or a run folder. Whether a
run is a baseline is decided by the one rule, `cameo_bench.config.spec.is_baseline`, after parsing
the param strings. Pure strings: no mlflow, no torch.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence

from cameo_bench.config.spec import is_baseline
from cameo_bench.tracking import keys

SEP = " · "
DEFAULT_SOURCE = "depth"  # CameoSpec.source's default: a label names the source only when it differs
SEED_BINDING = "run_experiment.seed"
# binding prefixes a sweep trial's label already says (the backbone's overrides are noise to a reader)
LABELLED = (keys.BACKBONE_PREFIX, keys.CAMEO_WEIGHT, keys.CAMEO_LAYER, keys.CAMEO_SOURCE, SEED_BINDING)


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


def supervised_layer_name(params: Mapping[str, str], layer: str | None = None) -> str:
    """The layer a CAMEO run supervises: `layer` (resolved by the caller), else the run's
    `cameo.layer_resolved` tag or param, else its `cameo.layer` (maybe a selector such as `depth:0.5`)."""
    resolved = params.get(keys.LAYER_RESOLVED)
    return layer or (resolved if resolved not in (None, "", keys.NONE) else None) or params.get(keys.CAMEO_LAYER, "?")


def run_label(params: Mapping[str, str], layer: str | None = None, extra: Sequence[str] = ()) -> str:
    """`<backbone> <preset> · baseline · s<seed>` or `<backbone> <preset> · CAMEO λ<weight> @<layer> · s<seed>`.

    `layer` is the resolved supervised layer (see `supervised_layer_name`); a source other than
    depth is named after it (`... @blocks.02.attn from pointmap_nn`). `extra` are further parts
    (a sweep's other axes, `label_extras`), placed before the seed. A run that logged no seed
    (older stores) has no seed part.
    """
    parts = [f"{params.get(keys.BACKBONE_NAME, '?')} {params.get(keys.BACKBONE_PRESET, '?')}"]
    weight, source = cameo_weight_and_source(params)
    if is_baseline(weight, source):
        parts.append("baseline")
    else:
        arm = f"CAMEO λ{weight:g} @{supervised_layer_name(params, layer)}"
        parts.append(arm + (f" from {source}" if source not in ("", DEFAULT_SOURCE) else ""))
    parts += list(extra)
    if params.get(keys.SEED) not in (None, ""):
        parts.append(f"s{params[keys.SEED]}")
    return SEP.join(parts)


def _value_text(text: str) -> str:
    """A binding's gin text without the quotes of a plain string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, str) else text


def label_extras(varied: Sequence[str], bindings: Mapping[str, str]) -> list[str]:
    """`key=value` for a sweep trial's varied bindings that `run_label` does not already say
    (e.g. `queries_per_view=64`), in axis order."""
    return [f"{key.rsplit('.', 1)[-1]}={_value_text(bindings[key])}" for key in varied
            if not key.startswith(LABELLED)]


def label_tags(params: Mapping[str, str], layer: str | None = None) -> dict[str, str]:
    """The tags a runs table is grouped and filtered by: `variant` (baseline | cameo), `backbone`,
    `preset`, `layer`, `lambda`, `source`, `seed`. A baseline's are `lambda = 0` and
    `layer = source = none`: it supervises nothing, whatever its config's cameo section says."""
    baseline = params_are_baseline(params)
    weight, source = cameo_weight_and_source(params)
    return {
        keys.VARIANT: "baseline" if baseline else "cameo",
        keys.BACKBONE: params.get(keys.BACKBONE_NAME, "?"),
        keys.PRESET: params.get(keys.BACKBONE_PRESET, "?"),
        keys.LAYER: keys.NONE if baseline else supervised_layer_name(params, layer),
        keys.LAMBDA: "0" if baseline else f"{weight:g}",
        keys.SOURCE: keys.NONE if baseline else source,
        keys.SEED: params.get(keys.SEED, ""),
    }


def honest_params(params: Mapping[str, str], baseline: bool | None = None) -> dict[str, str]:
    """The params as a run logs them: a baseline's `cameo.*` values (but its weight) become `none`.

    A baseline trains no CAMEO, so the layer, source and head its config happens to carry (a sweep
    that collapses baselines keeps the base file's, e.g. the DiT arm's `depth:0.5` in a UNet
    baseline) would only suggest a supervision that never ran. The weight stays: with `none` as
    the source it still reads as a baseline under `is_baseline`. `baseline` overrides what the
    params say (default values, logged as some trial's would be).
    """
    if not (params_are_baseline(params) if baseline is None else baseline):
        return dict(params)
    return {k: (keys.NONE if k.startswith(keys.CAMEO_PREFIX) and k != keys.CAMEO_WEIGHT else v)
            for k, v in params.items()}
