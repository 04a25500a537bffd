"""tests/benchmarks/source_accuracy.py: its scores on hand-built targets, and a run on the source study's sweep."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

from cameo_bench.correspondence.targets import CorrespondenceTargets

SCRIPT = pathlib.Path(__file__).parent / "benchmarks" / "source_accuracy.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("source_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _targets(idx, valid, weight=None):
    idx = torch.tensor(idx).reshape(1, 8, 2, -1)  # B 1, V 2 of 2x2 tokens: N 8 queries
    weight = torch.ones(idx.shape) if weight is None else torch.tensor(weight).reshape(idx.shape)
    return CorrespondenceTargets(idx, weight, torch.tensor(valid, dtype=torch.bool).reshape(1, 8, 2), (2, 2, 2))


def test_scores_count_the_pairs_by_hand(script):
    # 8 queries x 2 views, own view never valid: view 0's 4 queries look at view 1, view 1's at view 0.
    truth_valid = [[0, 1]] * 3 + [[0, 0]] + [[1, 0]] * 4  # 7 of the 8 pairs visible
    truth = _targets([[0, 0], [0, 1], [0, 2], [0, 3], [0, 0], [1, 0], [2, 0], [3, 0]], truth_valid)
    # The source: 4 supervised pairs. Query 0: exact. 1: token 1 -> 2 (Chebyshev 1 on the 2x2 grid:
    # (1,0) vs (0,1)). 3: hidden for depth. 4: exact.
    got = _targets([[0, 0], [0, 2], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
                   [[0, 1], [0, 1], [0, 0], [0, 1], [1, 0], [0, 0], [0, 0], [0, 0]])
    row = script.score(got, truth, 2)
    assert row["supervised"] == pytest.approx(4 / 8)
    assert row["visible"] == pytest.approx(3 / 4)
    assert row["pairs"] == 3 and row["exact"] == pytest.approx(2 / 3) and row["within 1"] == pytest.approx(1.0)

    # Soft targets: the heaviest token decides exact; the weight within one token is summed.
    # On a 3x3 grid token 8 is two away from token 0.
    truth3 = CorrespondenceTargets(torch.zeros(1, 18, 2, 1, dtype=torch.long), torch.ones(1, 18, 2, 1),
                                   torch.zeros(1, 18, 2, dtype=torch.bool), (2, 3, 3))
    truth3.valid[0, 0, 1] = True
    idx = torch.zeros(1, 18, 2, 2, dtype=torch.long)
    weight = torch.zeros(1, 18, 2, 2)
    idx[0, 0, 1], weight[0, 0, 1] = torch.tensor([8, 1]), torch.tensor([0.7, 0.3])
    soft = CorrespondenceTargets(idx, weight, truth3.valid.clone(), (2, 3, 3))
    row = script.score(soft, truth3, 3)
    assert row["exact"] == 0.0 and row["within 1"] == 0.0 and row["mass within 1"] == pytest.approx(0.3)


def test_the_source_sweep_ranks_depth_above_the_control(script, capsys):
    rows = {r["source"]: r for r in script.main(["--scenes", "2"])}
    assert rows["depth"]["exact"] == 1.0 and rows["depth"]["visible"] == 1.0
    assert rows["shuffled"]["within 1"] < 0.5 < rows["pointmap_nn"]["within 1"]
    assert {"matches", "epipolar", "noisy_depth {'noise': 0.2, 'seed': 0}"} <= set(rows)
    assert "| source | supervised |" in capsys.readouterr().out
