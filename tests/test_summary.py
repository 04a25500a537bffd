"""The quickstart's side-by-side table, read from run folders written by hand."""
import json
import re

from cameo_bench import sweep
from cameo_bench.report.summary import summary_table


def write_metrics(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as fh:
        for step, key, value in rows:
            fh.write(json.dumps({"step": step, "key": key, "value": value}) + "\n")


def parse_table(text: str):
    """Header and rows of a markdown table; `\\|` inside a cell is a pipe, not a column break."""
    def cells(line):
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    lines = text.splitlines()
    header = cells(lines[0])
    assert all(len(cells(line)) == len(header) for line in lines[2:]), "a row splits into more columns than the header"
    return header, {cells(line)[0]: cells(line) for line in lines[2:]}


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
    header, rows = parse_table(summary_table(plan))
    base_row = rows["mv_dit micro · baseline · s0"]
    assert base_row[header.index("PSNR")] == "12.50" and base_row[header.index("step")] == "4"
    assert base_row[header.index("PCK@1 (sup. layer)")] == "0.250"
    assert base_row[header.index("s/step")] == "0.30"
    cameo_row = rows["mv_dit micro · CAMEO λ0.5 @blocks.01.attn · s0"]
    assert cameo_row[header.index("PSNR")] == "13.25" and cameo_row[header.index("PCK@1 (sup. layer)")] == "0.750"
    assert "SSIM" not in header  # no value anywhere: column dropped


def test_quickstart_rows_are_labelled_by_backbone_and_arm_not_by_gin_values(tmp_path):
    """The quickstart's axes bind whole backbone dicts: the labels used to be those dicts
    (`baseline name='mv_dit' preset='tiny' overrides={'patch_size': 4}`)."""
    spec = sweep.SweepSpec(
        name="qs", base=["gin/experiments/smoke.gin"], output_dir=str(tmp_path),
        axes={"backbone": [
            {"backbone.name": "mv_dit", "backbone.preset": "micro", "backbone.overrides": {"patch_size": 4},
             "cameo.layer": "depth:0.5"},
            {"backbone.name": "mv_unet", "backbone.preset": "micro", "backbone.overrides": {},
             "cameo.layer": "up.01.attn.00"}],
            "cameo.weight": [0.0, 0.5], "run_experiment.seed": [3]})
    plan = sweep.plan(spec, check=False)
    for trial in plan.trials:
        write_metrics(plan.run_root / trial.id, [(4, "eval/psnr", 11.0)])
    text = summary_table(plan)
    _, rows = parse_table(text)
    # depth:0.5 of the 2-block micro DiT is its first block (blocks.00.attn, blocks.01.attn)
    assert set(rows) == {"mv_dit micro · baseline · s3", "mv_dit micro · CAMEO λ0.5 @blocks.00.attn · s3",
                         "mv_unet micro · baseline · s3", "mv_unet micro · CAMEO λ0.5 @up.01.attn.00 · s3"}
    assert "overrides" not in text and "name=" not in text
