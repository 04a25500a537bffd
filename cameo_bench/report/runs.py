"""Group runs into variants (same configuration, several seeds) and match each variant to its baseline.

A variant is the set of runs whose parameters agree on everything but the seed (and the run's name
and output folder). Its baseline is the variant without CAMEO (the one rule of
`cameo_bench.config.spec.is_baseline`: weight 0 or source `none`) that agrees on every non-`cameo.*`
parameter; if none does (say the baseline trained longer), the one with the same backbone and data
settings that agrees on the most other parameters.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

from cameo_bench.report.floors import final_value
from cameo_bench.tracking import RunRecord, keys
from cameo_bench.tracking.labels import params_are_baseline

SEED_PARAMS = (keys.SEED,)  # data.seed picks the scenes: a data setting, not a replicate
BACKBONE_KEYS = (keys.BACKBONE_NAME, keys.BACKBONE_PRESET)  # reports have one section per backbone
IGNORED_PARAMS = keys.PLACEMENT_PARAMS + (keys.GIN_FILES,)
SUPERVISED = keys.SUPERVISED_PREFIX
_LAYER_KEY = re.compile(rf"^{re.escape(keys.ATTN)}(?P<layer>.+)/{re.escape(keys.PCK1)}$")


def is_baseline(run: RunRecord) -> bool:
    """The one baseline rule applied to the run's logged param strings."""
    try:
        return params_are_baseline(run.params)
    except ValueError as err:
        raise ValueError(f"run {run.run_id}: {err}") from err


def backbone_of(run: RunRecord) -> str:
    return f"{run.params.get(keys.BACKBONE_NAME, '?')}/{run.params.get(keys.BACKBONE_PRESET, '?')}"


def seed_of(run: RunRecord) -> str:
    return ",".join(run.params.get(k, "") for k in SEED_PARAMS)


def resolved_layer(run: RunRecord) -> str | None:
    """The layer the run's `cameo.layer` resolved to, as the engine logged it: the tag, or for runs
    logged before the redesign the param of the same name (`none` there meant a baseline)."""
    name = run.tags.get(keys.LAYER_RESOLVED) or run.params.get(keys.LAYER_RESOLVED)
    return None if name in (None, "", "none") else name


def config_params(run: RunRecord) -> dict[str, str]:
    """The parameters that define a variant, the resolved layer among them (a tag now, a param in
    runs logged before the redesign), so that old and new runs group alike."""
    params = {k: v for k, v in run.params.items() if k not in SEED_PARAMS and k not in IGNORED_PARAMS}
    if keys.LAYER_RESOLVED in run.tags:
        params[keys.LAYER_RESOLVED] = run.tags[keys.LAYER_RESOLVED]
    return params


def supervised_layer(run: RunRecord) -> str | None:
    """The resolved name of the supervised layer (`cameo.layer` may be a selector such as `depth:0.5`).

    None for a baseline: it supervises nothing, whatever its selector resolves to. Otherwise the
    logged `cameo.layer_resolved`; failing that, the one layer whose histories equal every
    `attn/supervised/*` history (the engine logs the same numbers under both names). None when no
    layer, or more than one, matches.
    """
    if is_baseline(run):
        return None
    if (logged := resolved_layer(run)) is not None:
        return logged
    supervised = {k[len(SUPERVISED):]: h for k, h in run.metrics.items() if k.startswith(SUPERVISED)}
    if not supervised:
        return None
    layers = {m["layer"] for k in run.metrics if (m := _LAYER_KEY.match(k)) and m["layer"] != keys.SUPERVISED_LAYER}
    matches = [layer for layer in sorted(layers)
               if all(run.metrics.get(keys.attn(layer, suffix)) == h for suffix, h in supervised.items())]
    return matches[0] if len(matches) == 1 else None


@dataclass(eq=False)  # identity: variants are looked up in lists
class Variant:
    label: str
    backbone: str
    baseline_arm: bool
    params: dict[str, str]  # config_params shared by all runs
    runs: list[RunRecord]
    baseline: "Variant | None" = None
    layer: str | None = None  # resolved supervised layer
    rescale: Callable | None = None  # f(run, curve) -> curve against FLOPs / seconds (report.xaxis); None = steps

    @property
    def seeds(self) -> list[str]:
        return [seed_of(r) for r in self.runs]

    def curves(self, key: str) -> list[list[tuple[int, float]]] | None:
        """One history per seed, or None if any run lacks the metric."""
        found = [r.metrics.get(key) for r in self.runs]
        if any(not c for c in found):
            return None
        return found if self.rescale is None else [self.rescale(r, c) for r, c in zip(self.runs, found)]

    def finals(self, key: str) -> list[float]:
        """The last logged value of `key` in each run that logged it."""
        return [x for r in self.runs if (x := final_value(r.metrics, key)) is not None]

    def key_for(self, metric: str, layer: str | None) -> str:
        """A baseline has no `attn/supervised/*`: read the variant's layer there instead."""
        if metric.startswith(SUPERVISED) and self.baseline_arm and layer:
            return keys.attn(layer, metric[len(SUPERVISED):])
        return metric


@dataclass
class Grouping:
    variants: list[Variant]  # baselines first, then variants in run order
    varying: list[str]  # params that differ among runs (seeds excluded): the sweep's axes
    unmatched: list[Variant] = field(default_factory=list)  # CAMEO variants without a baseline
    varying_by_backbone: dict[str, list[str]] = field(default_factory=dict)  # the same, within one backbone


def _short(key: str) -> str:
    return key.removeprefix(keys.CAMEO_PREFIX)


def _is_cameo(key: str) -> bool:
    return key.startswith(keys.CAMEO_PREFIX)


def _non_cameo(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if not _is_cameo(k)}


def with_later_knobs(runs: list[RunRecord]) -> list[RunRecord]:
    """The runs, where a param that some runs lack and all the others log with one value is filled
    in with it: a knob added after the older runs, whose one value since is its default (added so
    that it keeps the old behaviour), would otherwise split one configuration into two variants."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.params.items():
            values.setdefault(key, set()).add(value)
    later = {key: next(iter(v)) for key, v in values.items()
             if len(v) == 1 and key not in SEED_PARAMS and any(key not in r.params for r in runs)}
    if not later:
        return runs
    return [dataclasses.replace(r, params={**later, **r.params}) if later.keys() - r.params.keys() else r
            for r in runs]


def group_runs(runs: list[RunRecord]) -> Grouping:
    """Variants and their baselines. A baseline's own `cameo.*` values do not matter (weight 0)."""
    runs = with_later_knobs(runs)
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        params = config_params(run)
        key = tuple(sorted((_non_cameo(params) if is_baseline(run) else params).items())) + (("__base", is_baseline(run)),)
        groups.setdefault(key, []).append(run)
    varying = _varying(runs)
    by_backbone = {b: _varying([r for r in runs if backbone_of(r) == b]) for b in {backbone_of(r) for r in runs}}
    variants = []
    for members in groups.values():
        base = is_baseline(members[0])
        varying_here = by_backbone[backbone_of(members[0])]  # a label need not repeat what the backbone decides
        params = _non_cameo(config_params(members[0])) if base else config_params(members[0])
        label = "baseline" if base else (", ".join(f"{_short(k)}={params.get(k, '-')}" for k in varying_here
                                                   if k in params and _is_cameo(k)) or "cameo")
        extra = [f"{_short(k)}={params[k]}" for k in varying_here if not _is_cameo(k) and k in params]
        if extra:
            label = f"{label} [{', '.join(extra)}]"
        layers = {supervised_layer(r) for r in members} - {None}
        variants.append(Variant(label, backbone_of(members[0]), base, params, members,
                                layer=next(iter(layers)) if len(layers) == 1 else None))
    baselines = [v for v in variants if v.baseline_arm]
    unmatched = []
    for v in variants:
        if v.baseline_arm:
            continue
        v.baseline = _match(v, baselines)
        if v.baseline is None:
            unmatched.append(v)
    variants.sort(key=lambda v: (v.backbone, not v.baseline_arm))
    return Grouping(variants, varying, unmatched, by_backbone)


def _varying(runs: list[RunRecord]) -> list[str]:
    """Parameters that differ between the runs: `cameo.*` among CAMEO runs, the rest among all."""
    cameo_runs = [config_params(r) for r in runs if not is_baseline(r)]
    every = [_non_cameo(config_params(r)) for r in runs]
    if all(p.get(keys.LAYER_RESOLVED) == p.get(keys.CAMEO_LAYER) for p in cameo_runs):  # names, not selectors
        cameo_runs = [{k: v for k, v in p.items() if k != keys.LAYER_RESOLVED} for p in cameo_runs]
    return sorted({k for p in cameo_runs for k in p if _is_cameo(k) and len({q.get(k) for q in cameo_runs}) > 1}
                  | {k for p in every for k in p if k not in BACKBONE_KEYS and len({q.get(k) for q in every}) > 1})


def _match(variant: Variant, baselines: list[Variant]) -> Variant | None:
    own = _non_cameo(variant.params)
    for b in baselines:
        if b.params == own:
            return b
    near = [b for b in baselines if all(b.params.get(k) == v for k, v in own.items()
                                        if k.startswith((keys.BACKBONE_PREFIX, keys.DATA_PREFIX)))]
    if not near:
        return None
    return max(near, key=lambda b: sum(b.params.get(k) == v for k, v in own.items()))
