"""The backbones section: two architectures with linear PSNR curves and known FLOPs per step, read at
the common step and at the common training-FLOP budget, against numbers worked out by hand here."""
import pytest

from cameo_bench.report import architectures, build_report, group_runs
from cameo_bench.tracking import RunRecord, keys

# backbone -> (cameo.layer, last step, params); arm weight -> (PSNR slope per step, FLOPs per step) per backbone
BACKBONES = {"mv_dit": ("blocks.02.attn", 1000, 12.5e6), "mv_unet": ("up.01.attn.00", 600, 30e6)}
ARMS = {"mv_dit": {0.0: (0.010, 2e9), 0.5: (0.012, 2.5e9)}, "mv_unet": {0.0: (0.020, 5e9), 0.5: (0.025, 6e9)}}


def record(name: str, weight: float, seed: int, flops: bool = True, layer: str | None = None) -> RunRecord:
    """PSNR = 10 + seed + slope x step, evaluated every 100 steps from 0: seeds 0 and 1 have mean
    10.5 + slope x step and standard deviation (ddof 1) 1/sqrt(2) = 0.707 at every step."""
    default_layer, last, n_params = BACKBONES[name]
    slope, per_step = ARMS[name].get(weight, (0.0, 1e9))  # an arm outside ARMS: flat, 1 GFLOP per step
    params = {"backbone.name": name, "backbone.preset": "tiny", "cameo.weight": str(weight),
              "cameo.layer": layer or default_layer, "cameo.source": "depth", "cameo.head": "mean", "seed": str(seed),
              "data.azimuth_step_deg": "30.0", "name": f"{name}{weight}{seed}", "train.steps": str(last)}
    metrics = {keys.PSNR: [(s, 10.0 + seed + slope * s) for s in range(0, last + 1, 100)],
               keys.PARAM_COUNT: [(0, n_params)]}
    if flops:
        metrics[keys.TRAIN_FLOPS_PER_STEP] = [(0, per_step)]
    return RunRecord(f"{name}-{weight}-{seed}-{layer}", params["name"], params, {}, metrics)


def sweep(**kw) -> list[RunRecord]:
    return [record(name, w, s, **kw) for name in BACKBONES for w in (0.0, 0.5) for s in (0, 1)]


def backbones_of(runs) -> dict:
    out = {}
    for v in group_runs(runs).variants:
        out.setdefault(v.backbone, []).append(v)
    return out


def test_arms_match_across_backbones_without_their_layer_names():
    runs = sweep() + [record("mv_unet", 0.5, 0, layer="up.02.attn.00")]  # a second UNet CAMEO arm: another layer
    runs.append(record("mv_unet", 0.1, 0))  # only on the UNet: not matched
    arms, ambiguous = architectures.match_arms(backbones_of(runs))
    assert [sorted(arm) for arm in arms] == [["mv_dit/tiny", "mv_unet/tiny"]]  # the baselines only
    assert all(v.baseline_arm for v in arms[0].values())
    assert [dict(k)[keys.CAMEO_WEIGHT] for k in ambiguous] == ["0.5"]  # two lambda-0.5 arms on the UNet: left out
    arms, ambiguous = architectures.match_arms(backbones_of(sweep()))
    assert not ambiguous and [[v.baseline_arm for v in arm.values()] for arm in arms] == [[True, True], [False, False]]


def test_values_at_the_common_step_and_the_common_flop_budget_are_the_hand_computed_ones():
    lines = architectures.section(backbones_of(sweep()))
    md = "\n".join(lines)
    assert lines[0] == architectures.HEADING
    # common step: DiT evaluates to 1000, the UNet to 600 -> 600; PSNR mean 10.5 + slope x 600
    # budget: min(1000 x 2, 1000 x 2.5, 600 x 5, 600 x 6) GFLOP = 2000 GFLOP = 2 TFLOP, reached at step
    # 2e12 / FLOPs per step = 1000, 800, 400 and 333.3 (between the UNet CAMEO evaluations at 300 and 400)
    assert "Equal steps: step 600" in md and "Equal training compute: 2 TFLOP" in md
    assert "| arm | backbone | params (M) | GFLOP / step | eval/psnr @ step 600 | eval/psnr @ 2 TFLOP |" in md
    assert "| baseline | mv_dit/tiny | 12.50 | 2.00 | 16.500 ± 0.707 | 20.500 ± 0.707 |" in md  # 10.5 + 6, 10.5 + 10
    assert "| cameo | mv_dit/tiny | 12.50 | 2.50 | 17.700 ± 0.707 | 20.100 ± 0.707 |" in md  # + 7.2, + 0.012 x 800
    assert "| baseline | mv_unet/tiny | 30.00 | 5.00 | 22.500 ± 0.707 | 18.500 ± 0.707 |" in md  # + 12, + 0.02 x 400
    assert "| cameo | mv_unet/tiny | 30.00 | 6.00 | 25.500 ± 0.707 | 18.833 ± 0.707 |" in md  # + 15, + 0.025 x 1000/3
    assert md.count("CAMEO's speed-up over its baseline on each backbone is in the speed-up section below") == 1


def test_value_at_interpolates_linearly_and_never_extrapolates():
    curve = [(0.0, 1.0), (10.0, 3.0), (30.0, 4.0)]
    assert architectures.value_at(curve, 5.0) == pytest.approx(2.0)
    assert architectures.value_at(curve, 20.0) == pytest.approx(3.5)
    assert architectures.value_at(curve, 31.0) is None and architectures.value_at(curve, -1.0) is None


def test_runs_without_flops_keep_the_step_part_and_say_why_the_compute_part_is_missing():
    runs = sweep()
    del runs[-1].metrics[keys.TRAIN_FLOPS_PER_STEP]  # the last UNet CAMEO seed
    md = "\n".join(architectures.section(backbones_of(runs)))
    assert f"1 of 8 runs logged no `{keys.TRAIN_FLOPS_PER_STEP}`" in md and "TFLOP |" not in md
    assert "| cameo | mv_unet/tiny | 30.00 | 6.00 | 25.500 ± 0.707 |" in md  # GFLOP/step from the seed that logged it
    md = "\n".join(architectures.section(backbones_of(sweep(flops=False))))
    assert "8 of 8 runs" in md and "| baseline | mv_dit/tiny | 12.50 | — | 16.500 ± 0.707 |" in md


def test_one_backbone_has_no_section():
    runs = [r for r in sweep() if r.params["backbone.name"] == "mv_dit"]
    assert architectures.section(backbones_of(runs)) == []


def _section_of(md: str) -> str:
    start = md.index(architectures.HEADING)
    return md[start:md.index("\n## ", start + 1)]


def test_build_report_has_the_section_after_convergence_and_the_same_in_both_x_modes(tmp_path):
    runs = sweep()
    build_report(runs, tmp_path / "s", experiment="s", n_boot=10, draw=False, metrics=(keys.PSNR,))
    build_report(runs, tmp_path / "f", experiment="f", n_boot=10, draw=False, metrics=(keys.PSNR,), x="flops")
    by_steps, by_flops = ((tmp_path / d / "report.md").read_text() for d in ("s", "f"))
    assert by_steps.index("## Convergence") < by_steps.index(architectures.HEADING) < by_steps.index("## Speed-up")
    assert "| cameo | mv_unet/tiny | 30.00 | 6.00 | 25.500 ± 0.707 | 18.833 ± 0.707 |" in _section_of(by_steps)
    assert _section_of(by_steps) == _section_of(by_flops)
    one = [r for r in runs if r.params["backbone.name"] == "mv_unet"]
    build_report(one, tmp_path / "o", experiment="o", n_boot=10, draw=False, metrics=(keys.PSNR,))
    assert architectures.HEADING not in (tmp_path / "o" / "report.md").read_text()
