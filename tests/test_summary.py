"""The quickstart's side-by-side table, read from run folders written by hand."""
import json

from cameo_bench import sweep
from cameo_bench.report.summary import summary_table


def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        for step, key, value in rows:
            fh.write(json.dumps({"step": step, "key": key, "value": value}) + "\n")


def test_table_reads_last_eval_and_compares_baselines_at_the_supervised_layer(tmp_path):
    spec = sweep.SweepSpec(
        name="qs", base=["gin/experiments/smoke.gin"], output_dir=str(tmp_path),
        axes={"cameo.weight": [0.0, 0.5], "cameo.layer": ["blocks.01.attn"]})
    plan = sweep.plan(spec, check=False)
    base = next(t for t in plan.trials if t.baseline)
    cameo = next(t for t in plan.trials if not t.baseline)
    write_metrics(plan.run_root / base.id, [
        (2, "eval/psnr", 10.0), (4, "eval/psnr", 12.5),
        (4, "attn/blocks.00.attn/pck@1", 0.9),  # the layer smoke.gin's default selector names
        (4, "attn/blocks.01.attn/pck@1", 0.25),  # the layer the CAMEO sibling supervises
        (1, "time/step_seconds", 0.2), (2, "time/step_seconds", 0.4), (3, "time/step_seconds", 0.3)])
    write_metrics(plan.run_root / cameo.id, [(4, "eval/psnr", 13.25), (4, "attn/supervised/pck@1", 0.75)])
    lines = summary_table(plan).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    base_row = rows[base.label]
    assert base_row[header.index("PSNR")] == "12.50" and base_row[header.index("step")] == "4"
    assert base_row[header.index("PCK@1 (sup. layer)")] == "0.250"
    assert base_row[header.index("s/step")] == "0.30"
    cameo_row = rows[cameo.label]
    assert cameo_row[header.index("PSNR")] == "13.25" and cameo_row[header.index("PCK@1 (sup. layer)")] == "0.750"
    assert "SSIM" not in header  # no value anywhere: column dropped
