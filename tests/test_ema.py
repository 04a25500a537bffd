"""EMA with a warm-up ramp: the averaged weights follow a hand-written loop of the formula."""
from __future__ import annotations

import torch

from cameo_bench.engine.build import ema_update


def test_ema_warmup_follows_the_ramped_decay():
    model = torch.nn.Linear(3, 2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(0.9, 10))
    expected = [p.detach().clone() for p in model.parameters()]  # AveragedModel copies at creation
    ema.update_parameters(model)  # the first update copies too (nothing averaged yet)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_warmup_keeps_torchs_fixed_decay():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(0.5, 0))
    ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for got, s in zip(ema.module.parameters(), start):
        torch.testing.assert_close(got, s + 0.5)
