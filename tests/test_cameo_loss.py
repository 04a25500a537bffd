"""CameoLoss against a naive full-map implementation written from the paper's text.

The naive version builds the whole N x N logit map, applies the head to every pair, normalises,
writes every (query, key view) target as a full-length row over all N keys, and averages the
masked per-pair losses; nothing is shared with the chunked implementation except the parameters.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from backbones.interface import TapResult
from cameo_bench.objectives import alignment, alignment_sparse
from cameo_bench.objectives.alignment import CameoLoss
from cameo_bench.correspondence.targets import CorrespondenceTargets

B, V, h, w, H, D = 2, 3, 4, 4, 2, 8
HW, N = h * w, V * h * w
NUM_REF = 1


def make_problem(seed: int = 0, k: int = 2):
    """Random q/k and random sparse targets with invalid pairs and never own-view pairs."""
    g = torch.Generator().manual_seed(seed)
    q_full = torch.randn(B, H, N, D, generator=g) * 2.0
    k_all = torch.randn(B, H, N, D, generator=g) * 2.0
    idx = torch.randint(0, HW, (B, N, V, k), generator=g)
    weight = torch.rand(B, N, V, k, generator=g) + 0.05
    weight = weight / weight.sum(-1, keepdim=True)
    valid = torch.rand(B, N, V, generator=g) < 0.7
    own = (torch.arange(N) // HW)[:, None] == torch.arange(V)[None, :]  # [N, V]
    valid &= ~own[None]
    cost = torch.rand(B, N, V, generator=g)
    return q_full, k_all, CorrespondenceTargets(idx, weight, valid, (V, h, w)), cost


def randomise_head(loss: CameoLoss, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def tap_for(q_full, k_all, query_idx) -> TapResult:
    q = torch.gather(q_full, 2, query_idx[:, None, :, None].expand(B, H, -1, D))
    return TapResult(q=q, k=k_all, scale=D**-0.5, grid=(V, h, w), query_idx=query_idx)


def naive_scores(q_full, k_all, head, params):
    """Fused logits of every (query, key) pair: [B, Ho, N, V, HW]."""
    scale = D**-0.5
    S = torch.einsum("bhqd,bhkd->bhqk", q_full, k_all) * scale  # [B, H, N, N] every logit
    if head == "mean":
        Fz = S.mean(1, keepdim=True)
    elif head == "linear":
        Fz = torch.einsum("h,bhqk->bqk", params["head_weight"], S)[:, None]
    elif head == "mlp":  # as CAMEO's HeadMlp_Softmax, less the last bias the softmax ignores
        hidden = torch.nn.functional.gelu(
            torch.einsum("bhqk,oh->bqko", S, params["head.0.weight"]) + params["head.0.bias"]
        )  # [B, N, N, 4H]
        Fz = torch.einsum("bqko,po->bpqk", hidden, params["head.2.weight"])  # [B, 1, N, N]
    else:
        Fz = S
    return Fz.reshape(B, Fz.shape[1], N, V, HW)


def naive_loss(Fz, targets, cost, query_idx, opts):
    """Literal reading of cameo_method.md 'The loss, precisely' on the full N x N map Fz."""
    Ho = Fz.shape[1]

    view_of = torch.arange(N) // HW  # query view of every token
    qviews = {"references": [0], "targets": [1, 2], "both": [0, 1, 2]}[opts["query_views"]]
    key_view = torch.arange(V)
    support = (key_view[None, :] != view_of[:, None]) & torch.isin(view_of, torch.tensor(qviews))[:, None]
    if opts["key_views"] == "references":
        support &= key_view[None, :] < NUM_REF  # [N, V] (query token, key view) scored

    # probabilities per key view, or over every supported key
    if opts["normalization"] == "per_view":
        logA = Fz.log_softmax(-1)  # [B, Ho, N, V, HW]
    else:
        masked = Fz.masked_fill(~support[None, None, :, :, None], float("-inf")).reshape(B, Ho, N, N)
        logA = masked.log_softmax(-1).reshape(B, Ho, N, V, HW)
        logA = torch.where(support[None, None, :, :, None], logA, torch.zeros(()))
    A = logA.exp() * (support[None, None, :, :, None] if opts["normalization"] == "global" else 1)

    # target rows P[b, n, j] over the h*w tokens of view j
    onehot_k = torch.nn.functional.one_hot(targets.idx, HW).float()  # [B, N, V, k, HW]
    if opts["target"] == "soft":
        P = (onehot_k * targets.weight[..., None]).sum(3)
        P = P / P.sum(-1, keepdim=True)
    else:
        best = targets.weight.argmax(-1)  # [B, N, V]
        P = torch.nn.functional.one_hot(targets.idx.gather(-1, best[..., None])[..., 0], HW).float()
    if opts["target"] == "onehot_global":  # only the key view holding the nearest point keeps its row
        if cost is not None:
            nearest = cost.masked_fill(~support[None], float("inf")).argmin(-1)  # [B, N]
        else:  # the first valid supported view
            nearest = torch.full((B, N), -1)
            for j in reversed(range(V)):
                nearest = torch.where(targets.valid[:, :, j] & support[None, :, j], j, nearest)
        P = P * (key_view[None, None, :] == nearest[..., None])[..., None]

    selected = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        selected[b, query_idx[b]] = True

    # one term per (query n, key view j): the prediction row against the full-length target
    # row holding P_ij in the block of view j and zeros elsewhere
    T = torch.zeros(B, N, V, V, HW)  # [B, n, j, key view, HW]
    for j in range(V):
        T[:, :, j, j] = P[:, :, j]
    T = T[:, None]  # heads
    if opts["normalization"] == "per_view":  # row = the keys of view j only
        a = torch.stack([A[:, :, :, j] for j in range(V)], 3)  # [B, Ho, N, j, HW]
        la = torch.stack([logA[:, :, :, j] for j in range(V)], 3)
        t = torch.stack([T[:, :, :, j, j] for j in range(V)], 3)
    else:  # row = every supported key
        a, la, t = A.flatten(-2)[:, :, :, None], logA.flatten(-2)[:, :, :, None], T.flatten(-2)
    if opts.get("log_eps", 0.0) > 0:  # the released code's log(p + eps)
        la = (a + opts["log_eps"]).log()
    if opts["loss"] == "ce":
        L = -(t * la).sum(-1)
    elif opts["loss"] == "kl":
        L = (torch.where(t > 0, t * (t.clamp_min(1e-30).log() - la), 0.0)).sum(-1)
    else:
        L = (a - t).abs().sum(-1)  # [B, Ho, N, V]

    total = 0.0
    for group in ([0], [1, 2]):  # reference-query and target-query terms averaged separately
        in_group = torch.isin(view_of, torch.tensor(group))
        counted = targets.valid & support[None] & selected[:, :, None] & in_group[None, :, None]  # [B, N, V]
        count = counted.sum()
        if count > 0:
            total = total + (L * counted[:, None]).sum() / (count * Ho)
    return total


OPTION_GRID = list(itertools.product(
    ("mean", "linear", "mlp", "per_head"),
    ("per_view", "global"),
    ("onehot_per_view", "onehot_global", "soft"),
    ("ce", "kl", "l1"),
))
VIEW_GRID = list(itertools.product(("references", "targets", "both"), ("all_but_self", "references"), (None, 5)))


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def run_both(problem, opts, qpv=None, chunk_size=16, backward="fused", cost=None, seed=3, Fz=None, query_idx=None):
    """(CameoLoss value, diagnostics, naive loss, leaf tensors, naive fused logits) for one option
    set (`opts` may name the `impl`).

    `Fz` may hold the naive fused logits from an earlier call with the same head (same seeded
    parameters) when gradients are not compared.
    """
    q_full, k_all, targets, _ = problem
    if cost is not None:
        targets = CorrespondenceTargets(targets.idx, targets.weight, targets.valid, targets.grid, cost)
    cameo = CameoLoss(H, queries_per_view=qpv, chunk_size=chunk_size, backward=backward, **opts)
    randomise_head(cameo)
    if query_idx is None:
        query_idx = cameo.select_queries(targets, NUM_REF, torch.Generator().manual_seed(seed))
    q_full, k_all = q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True)
    got, diag = cameo(tap_for(q_full, k_all, query_idx), targets, NUM_REF)
    params = dict(cameo.named_parameters())
    if Fz is None:
        Fz = naive_scores(q_full, k_all, opts["head"], params)
    want = naive_loss(Fz, targets, cost, query_idx, opts)
    return got, diag, want, [q_full, k_all, *params.values()], Fz


# every combination on both implementations; "sparse_pairs" is the sparse path with the one-hot rows
# of `alignment_onehot` switched off, as on problems above `ONEHOT_MAX_LOGITS`
IMPL_GRID = [(*opts, impl) for opts in OPTION_GRID for impl in ("sparse", "sparse_pairs", "dense")]


@pytest.mark.parametrize("head,normalization,target,loss,impl", IMPL_GRID)
def test_matches_naive_full_map(problem, head, normalization, target, loss, impl, monkeypatch):
    """Every option combination: the value always; gradients for q, k and every head parameter
    on the paper's views (both query groups, all other key views, all queries)."""
    if impl == "sparse_pairs":
        monkeypatch.setattr(alignment, "ONEHOT_MAX_LOGITS", -1)
        impl = "sparse"
    Fz = None
    default = ("both", "all_but_self", None)
    for query_views, key_views, qpv in [default] + [v for v in VIEW_GRID if v != default]:
        opts = dict(head=head, normalization=normalization, target=target, loss=loss,
                    query_views=query_views, key_views=key_views, impl=impl)
        got, diag, want, leaves, Fz_new = run_both(problem, opts, qpv, backward="autograd" if impl == "dense" else "fused", Fz=Fz)
        if not torch.is_tensor(want):  # nothing supervised (a lone reference with reference keys)
            assert got.item() == 0.0 and diag["pairs_ref"] + diag["pairs_tgt"] == 0
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{opts} qpv={qpv}: {m}")
        if Fz is None:  # first round: gradients, then reuse the naive map (detached) for the rest
            names = ["q", "k"] + [f"head param {i}" for i in range(len(leaves) - 2)]
            g_got = torch.autograd.grad(got, leaves, allow_unused=True)
            g_want = torch.autograd.grad(want, leaves, allow_unused=True)
            for name, a, b in zip(names, g_got, g_want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")
            Fz = Fz_new.detach()


DEFAULT = dict(head="mlp", normalization="per_view", target="onehot_per_view", loss="ce",
               query_views="both", key_views="all_but_self")


@pytest.mark.parametrize("opts", [
    dict(DEFAULT),
    dict(DEFAULT, head="per_head", normalization="global", target="soft", loss="kl"),
    dict(DEFAULT, head="linear", normalization="global", target="onehot_global", loss="l1"),
])
@pytest.mark.parametrize("chunk_size,backward", [(3, "fused"), (7, "fused"), (3, "checkpoint"), (7, "autograd")])
def test_dense_chunking_and_backward_modes_keep_value_and_gradients(problem, opts, chunk_size, backward):
    opts = dict(opts, impl="dense")
    for qpv in (None, 5):
        got, _, want, leaves, _ = run_both(problem, opts, qpv, chunk_size=chunk_size, backward=backward)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- the sparse path
@pytest.mark.parametrize("opts", [
    dict(DEFAULT, head="mean"),
    dict(DEFAULT),
    dict(DEFAULT, normalization="global", target="soft", loss="l1"),
    dict(DEFAULT, head="per_head", normalization="global", target="soft", loss="kl"),
    dict(DEFAULT, head="linear", normalization="global", target="onehot_global", loss="l1"),
    dict(DEFAULT, head="linear", target="soft", loss="l1"),
])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_sparse_chunks_keep_value_and_gradients(problem, opts, chunk_size):
    """Query chunks of any size (1 row per block, a ragged last chunk, one block) give the value
    and gradients of the naive map."""
    for qpv in (None, 5):
        got, _, want, leaves, _ = run_both(problem, opts, qpv, chunk_size=chunk_size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head,normalization,target,loss", [
    (h, n, t, l) for h in ("mean", "linear", "mlp", "per_head") for n in ("per_view", "global")
    for t in ("onehot_per_view", "onehot_global", "soft") for l in ("ce", "kl")])
def test_sparse_log_eps_matches_the_released_log_on_the_naive_map(problem, head, normalization, target, loss):
    """log(p + eps) needs p only at the target tokens: the sparse path admits it, value and gradients."""
    opts = dict(DEFAULT, head=head, normalization=normalization, target=target, loss=loss, impl="sparse", log_eps=2e-2)
    got, _, want, leaves, _ = run_both(problem, opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    exact, *_ = run_both(problem, dict(opts, log_eps=0.0))
    assert not torch.allclose(got, exact, atol=1e-3)  # eps really enters


def test_the_path_is_chosen_automatically(problem, monkeypatch):
    """auto: sparse for every head, dense when `backward` asks for a mode only dense has; the
    linear heads run without any logit-map matmul per head (one fused map), the MLP with one."""
    for head in ("mean", "linear", "per_head", "mlp"):
        assert CameoLoss(H, head=head).path == "sparse"
        assert CameoLoss(H, head=head, backward="checkpoint").path == "dense"
        assert CameoLoss(H, head=head, impl="dense").path == "dense"
    with pytest.raises(ValueError, match="backward='autograd'.*dense"):
        CameoLoss(H, impl="sparse", backward="autograd")
    with pytest.raises(ValueError, match="impl.*valid"):
        CameoLoss(H, head="mean", impl="triton")
    calls = []
    real = alignment_sparse.sparse_target_loss
    monkeypatch.setattr("cameo_bench.objectives.alignment.sparse_target_loss", lambda q, k, fold, run, mix=None, params=():
                        calls.append((fold.kind, mix is not None, len(params))) or real(q, k, fold, run, mix, params))
    for head, expected in (("mean", ("concat", False, 0)), ("linear", ("concat", True, 0)),
                           ("per_head", ("heads", False, 0)), ("mlp", ("heads", False, 3))):
        calls.clear()
        run_both(problem, dict(DEFAULT, head=head))
        assert calls == [expected], head
        calls.clear()
        run_both(problem, dict(DEFAULT, head=head, impl="dense"))
        assert not calls, head


def test_one_hot_rows_score_small_problems_and_the_per_pair_path_large_ones(problem, monkeypatch):
    """The quickstart's options go to `run_onehot` up to ONEHOT_MAX_LOGITS triples, to `run_pairs`
    above it (same numbers: test_matches_naive_full_map runs both)."""
    used = []
    for name in ("run_onehot", "run_pairs"):
        real = getattr(alignment, name)
        monkeypatch.setattr(alignment, name, lambda *a, _real=real, _name=name, **k: used.append(_name) or _real(*a, **k))
    opts = dict(DEFAULT, head="mean")
    run_both(problem, opts)
    monkeypatch.setattr(alignment, "ONEHOT_MAX_LOGITS", 0)
    run_both(problem, opts)
    run_both(problem, dict(opts, loss="l1"))  # not a one-hot CE: the per-pair path at any size
    assert used == ["run_onehot", "run_pairs", "run_pairs"]


@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_query_ids_in_any_order_and_per_sample_layouts(problem, impl):
    """Query ids need not come view after view, nor in the same layout for every sample: the plan
    then groups them from the ids (a sample at a time) and the value is still the naive one."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randperm(N, generator=g)[:20] for _ in range(B)]  # different views per position
    query_idx = torch.stack(rows)
    assert not torch.equal(query_idx[0] // HW, query_idx[1] // HW)
    for head, normalization in (("mean", "per_view"), ("mlp", "global"), ("per_head", "global"), ("mlp", "per_view")):
        opts = dict(DEFAULT, head=head, normalization=normalization, impl=impl)
        got, _, want, leaves, _ = run_both(problem, opts, query_idx=query_idx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sparse_without_grad_and_with_frozen_inputs(problem):
    """No graph without grad mode; a frozen q (or k) gets no gradient and the other the right one."""
    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **dict(DEFAULT, head="linear"))
    randomise_head(cameo)
    query_idx = torch.arange(N).expand(B, N)
    with torch.no_grad():
        value, _ = cameo(tap_for(q_full, k_all, query_idx), targets, NUM_REF)
    assert not value.requires_grad
    k_leaf = k_all.clone().requires_grad_(True)
    got, _ = cameo(tap_for(q_full, k_leaf, query_idx), targets, NUM_REF)
    torch.testing.assert_close(got, value)
    want = naive_loss(naive_scores(q_full, k_leaf, "linear", dict(cameo.named_parameters())), targets, None,
                      query_idx, dict(DEFAULT, head="linear"))
    for a, b in zip(torch.autograd.grad(3.0 * got, [k_leaf, cameo.head_weight]),
                    torch.autograd.grad(3.0 * want, [k_leaf, cameo.head_weight]), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_onehot_global_follows_the_match_cost_when_targets_carry_it(problem):
    cost = problem[3]
    opts = dict(DEFAULT, target="onehot_global")
    with_cost, _, want, _, _ = run_both(problem, opts, cost=cost)
    torch.testing.assert_close(with_cost, want, atol=1e-5, rtol=1e-5)
    without_cost, *_ = run_both(problem, opts)
    assert not torch.allclose(with_cost, without_cost)  # the cost really picks the view


def test_onehot_global_counts_the_zero_rows():
    """One query, two valid key views, target only in the nearer one: the mean is over 2 terms."""
    Vt, hwt = 3, 4
    targets = CorrespondenceTargets(
        idx=torch.zeros(1, Vt * hwt, Vt, 1, dtype=torch.long),
        weight=torch.ones(1, Vt * hwt, Vt, 1),
        valid=torch.zeros(1, Vt * hwt, Vt, dtype=torch.bool),
        grid=(Vt, 1, hwt),
    )
    targets.valid[0, 2 * hwt, 0] = targets.valid[0, 2 * hwt, 1] = True  # one target-view query
    q = torch.zeros(1, 1, 1, 2)  # uniform attention: CE of a one-hot row is log(hw)
    tap = TapResult(q=q, k=torch.randn(1, 1, Vt * hwt, 2), scale=1.0, grid=(Vt, 1, hwt),
                    query_idx=torch.tensor([[2 * hwt]]))
    per_view, _ = CameoLoss(1, head="mean", target="onehot_per_view")(tap, targets, num_ref=1)
    global_, _ = CameoLoss(1, head="mean", target="onehot_global")(tap, targets, num_ref=1)
    torch.testing.assert_close(per_view, torch.tensor(math.log(hwt)))
    torch.testing.assert_close(global_, torch.tensor(math.log(hwt) / 2))


@pytest.mark.parametrize("normalization,loss,expected", [
    ("per_view", "ce", math.log(HW)),
    ("per_view", "kl", math.log(HW)),
    ("per_view", "l1", 2 * (1 - 1 / HW)),
    ("global", "ce", math.log((V - 1) * HW)),
    ("global", "l1", 2 * (1 - 1 / ((V - 1) * HW))),
])
def test_uniform_attention_gives_the_analytic_value(problem, normalization, loss, expected):
    """q = 0: every key equally likely, so each term is known in closed form."""
    _, k_all, targets, _ = problem
    query_idx = torch.arange(N).expand(B, N)
    tap = TapResult(q=torch.zeros(B, H, N, D), k=k_all, scale=D**-0.5, grid=(V, h, w), query_idx=query_idx)
    cameo = CameoLoss(H, head="mean", normalization=normalization, loss=loss)
    value, diag = cameo(tap, targets, NUM_REF)
    torch.testing.assert_close(value, torch.tensor(2 * expected))  # reference mean + target mean
    assert diag["pairs_ref"] > 0 and diag["pairs_tgt"] > 0


HEAD_PARAMETERS = {
    "mean": [], "per_head": [], "linear": ["head_weight"],
    # H -> 4H -> 1 GELU; no last bias: a constant added to every logit leaves each softmax as is,
    # so its gradient would be exactly zero (only rounding noise made it nonzero on some CPUs).
    "mlp": ["head.0.weight", "head.0.bias", "head.2.weight"],
}


@pytest.mark.parametrize("head", ["mean", "linear", "mlp", "per_head"])
def test_gradients_reach_q_k_and_the_head(problem, head):
    """Every leaf the loss depends on gets a gradient the math makes nonzero: q, k and each head
    parameter (for the MLP: both first-layer tensors and the last layer's weight)."""
    got, _, _, leaves, _ = run_both(problem, dict(DEFAULT, head=head))
    cameo = CameoLoss(H, **dict(DEFAULT, head=head))
    assert [name for name, _ in cameo.named_parameters()] == HEAD_PARAMETERS[head]
    got.backward()
    for name, leaf in zip(["q", "k", *HEAD_PARAMETERS[head]], leaves, strict=True):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().max() > 1e-4, name  # O(1e-2) and up here; rounding noise is O(1e-9)


def test_mlp_head_shape_and_old_checkpoints_without_the_dead_bias():
    """H -> 4H -> 1 with GELU and no last bias; a state dict saved with that bias still loads
    (the bias is dropped: it never changed the loss)."""
    cameo = CameoLoss(H, head="mlp")
    first, act, last = cameo.head
    assert (first.in_features, first.out_features, first.bias is not None) == (H, 4 * H, True)
    assert isinstance(act, nn.GELU) and act.approximate == "none"
    assert (last.in_features, last.out_features, last.bias) == (4 * H, 1, None)
    old = dict(cameo.state_dict(), **{"head.2.bias": torch.tensor([0.3])})
    CameoLoss(H, head="mlp").load_state_dict(old)  # strict


def test_invalid_pairs_contribute_nothing(problem):
    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **DEFAULT)
    query_idx = torch.arange(N).expand(B, N)
    base, diag = cameo(tap_for(q_full, k_all, query_idx), targets, NUM_REF)
    garbage = CorrespondenceTargets(
        torch.where(targets.valid[..., None], targets.idx, -7),  # even out-of-range ids
        torch.where(targets.valid[..., None], targets.weight, 123.0),
        targets.valid, targets.grid,
    )
    again, _ = cameo(tap_for(q_full, k_all, query_idx), garbage, NUM_REF)
    torch.testing.assert_close(again, base, atol=0, rtol=0)
    fewer = targets.valid.clone()
    fewer[0, N - 1] = False  # drop the pairs of one query: the value must move
    assert targets.valid[0, N - 1].any()
    changed, diag2 = cameo(tap_for(q_full, k_all, query_idx),
                           CorrespondenceTargets(targets.idx, targets.weight, fewer, targets.grid), NUM_REF)
    assert not torch.allclose(changed, base)
    assert diag2["pairs_tgt"] == diag["pairs_tgt"] - targets.valid[0, N - 1].sum()


def test_fused_backward_follows_the_outer_weight_and_frozen_inputs(problem):
    """The fused mode stores gradients in the forward: they must still be scaled by lambda and
    skip inputs that do not require grad (e.g. a frozen backbone, only the head trains)."""
    got, _, want, leaves, _ = run_both(problem, dict(DEFAULT, normalization="global"))
    lam = 0.02
    for a, b in zip(torch.autograd.grad(lam * got, leaves), torch.autograd.grad(lam * want, leaves), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **DEFAULT)
    value, _ = cameo(tap_for(q_full, k_all, torch.arange(N).expand(B, N)), targets, NUM_REF)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cameo.parameters())
    with torch.no_grad():
        again, _ = cameo(tap_for(q_full, k_all, torch.arange(N).expand(B, N)), targets, NUM_REF)
    assert not again.requires_grad
    torch.testing.assert_close(again, value.detach())


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_no_valid_pair_gives_zero_with_finite_gradient(problem, head):
    q_full, k_all, targets, _ = problem
    none = CorrespondenceTargets(targets.idx, targets.weight, torch.zeros_like(targets.valid), targets.grid)
    cameo = CameoLoss(H, **dict(DEFAULT, head=head))
    q_full, k_all = q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True)
    value, diag = cameo(tap_for(q_full, k_all, cameo.select_queries(none, NUM_REF)), none, NUM_REF)
    value.backward()
    assert value.item() == 0.0 and diag["pairs_ref"] == 0 and diag["pairs_tgt"] == 0
    for leaf in (q_full, k_all, *cameo.parameters()):
        assert leaf.grad is not None and torch.all(leaf.grad == 0)


def test_per_view_and_global_agree_with_one_key_view_and_differ_with_several(problem):
    """Global softmax over a single supported key view is the per-view softmax."""
    one = dict(DEFAULT, head="mean", query_views="targets", key_views="references")  # 1 reference
    values = [run_both(problem, dict(one, normalization=n))[0] for n in ("per_view", "global")]
    torch.testing.assert_close(values[0], values[1])
    several = dict(DEFAULT, head="mean")
    values = [run_both(problem, dict(several, normalization=n))[0] for n in ("per_view", "global")]
    assert values[1] > values[0] + 0.1  # mass spread over more keys: a larger CE


def test_select_queries_draws_valid_tokens_per_view(problem):
    _, _, targets, _ = problem
    cameo = CameoLoss(H, **dict(DEFAULT, query_views="targets"), queries_per_view=5)
    picks = cameo.select_queries(targets, NUM_REF, torch.Generator().manual_seed(0))
    assert picks.shape == (B, 2 * 5)
    view = picks // HW
    assert (view[:, :5] == 1).all() and (view[:, 5:] == 2).all()
    has_pair = targets.valid.any(-1)  # [B, N]; own view is never valid
    assert torch.gather(has_pair, 1, picks).all()  # enough valid tokens: only valid ones drawn
    assert all(len(set(row.tolist())) == row.numel() for row in picks)
    same = cameo.select_queries(targets, NUM_REF, torch.Generator().manual_seed(0))
    other = cameo.select_queries(targets, NUM_REF, torch.Generator().manual_seed(1))
    assert torch.equal(picks, same) and not torch.equal(picks, other)
    # fewer valid tokens than asked: every valid one is taken, the rest is padding without pairs
    sparse = targets.valid.clone()
    sparse[:, HW:2 * HW] = False
    sparse[:, HW + 3] = targets.valid[:, HW + 3] | torch.tensor([False, True, False])
    t2 = CorrespondenceTargets(targets.idx, targets.weight, sparse, targets.grid)
    picks = cameo.select_queries(t2, NUM_REF, torch.Generator().manual_seed(0))
    assert (picks[:, :5] == HW + 3).any(1).all()
    everything = CameoLoss(H, **DEFAULT).select_queries(targets, NUM_REF)
    assert torch.equal(everything, torch.arange(N).expand(B, N))


def test_runs_in_fp32_under_autocast(problem):
    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **DEFAULT)
    query_idx = torch.arange(N).expand(B, N)
    q16, k16 = q_full.bfloat16(), k_all.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = cameo(tap_for(q16, k16, query_idx), targets, NUM_REF)
    ref, _ = cameo(tap_for(q16.float(), k16.float(), query_idx), targets, NUM_REF)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=1e-5, rtol=1e-5)


def test_accuracy_diagnostic_reads_the_argmax(problem):
    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **dict(DEFAULT, head="mean"))
    query_idx = torch.arange(N).expand(B, N)
    with torch.no_grad():
        Fz = naive_scores(q_full, k_all, "mean", {})  # [B, 1, N, V, HW]
    top2 = Fz[:, 0].topk(2, dim=-1)  # [B, N, V, 2]
    best = top2.indices[..., :1]  # [B, N, V, 1]: targets at the attention argmax
    # Only pairs whose argmax is clear: a near tie could go either way with other rounding.
    clear = targets.valid & (top2.values[..., 0] - top2.values[..., 1] > 1e-3)
    assert clear.sum() > 0.9 * targets.valid.sum()
    hit = CorrespondenceTargets(best, torch.ones_like(best, dtype=torch.float), clear, targets.grid)
    _, diag = cameo(tap_for(q_full, k_all, query_idx), hit, NUM_REF)
    assert diag["acc"].item() == 1.0
    miss = CorrespondenceTargets((best + 1) % HW, hit.weight, clear, targets.grid)
    _, diag = cameo(tap_for(q_full, k_all, query_idx), miss, NUM_REF)
    assert diag["acc"].item() == 0.0


def test_bad_options_and_inputs_say_what_is_valid(problem):
    with pytest.raises(ValueError, match="valid: .*'mlp'"):
        CameoLoss(H, head="mlpp")
    with pytest.raises(ValueError, match="queries_per_view"):
        CameoLoss(H, query_sampling="per_view")
    q_full, k_all, targets, _ = problem
    tap = tap_for(q_full, k_all, torch.arange(N).expand(B, N))
    with pytest.raises(ValueError, match="heads"):
        CameoLoss(H + 1)(tap, targets, NUM_REF)
    wrong_grid = CorrespondenceTargets(targets.idx[:, :, :, :], targets.weight, targets.valid, (V, w, h))
    tap.grid = (V, 2, 8)
    with pytest.raises(ValueError, match="grid"):
        CameoLoss(H)(tap, wrong_grid, NUM_REF)


def test_reads_the_tap_of_the_shared_attention(problem):
    """End to end with `multiview_attention`: the rows it hands out for `select_queries` give the
    same loss as the naive map on the q/k it attended with, and the gradient reaches them."""
    from backbones.attention import multiview_attention
    from backbones.interface import TapRequest, TapState

    q_full, k_all, targets, _ = problem
    cameo = CameoLoss(H, **dict(DEFAULT, target="onehot_global"), queries_per_view=6)
    query_idx = cameo.select_queries(targets, NUM_REF, torch.Generator().manual_seed(5))
    q_full, k_all = q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True)
    state = TapState(num_views=V, request=TapRequest("layer_00", query_idx))
    multiview_attention(q_full, k_all, torch.randn(B, H, N, D), grid=(V, h, w), cross_view=True,
                        layer_name="layer_00", state=state)
    got, _ = cameo(state.result, targets, NUM_REF)
    want = naive_loss(naive_scores(q_full, k_all, "mlp", dict(cameo.named_parameters())), targets, None,
                      query_idx, dict(DEFAULT, target="onehot_global"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.backward()
    assert q_full.grad[:, :, query_idx[0]].abs().sum() > 0 and k_all.grad.abs().sum() > 0


# ------------------------------------------------------------------------- log_eps
def one_pair_problem(logit_gap: float):
    """One target-view query, one valid reference key view of two tokens; the target token's
    logit is `logit_gap` below the other one's, so its probability is sigmoid(-logit_gap)."""
    targets = CorrespondenceTargets(
        idx=torch.zeros(1, 4, 2, 1, dtype=torch.long), weight=torch.ones(1, 4, 2, 1),
        valid=torch.zeros(1, 4, 2, dtype=torch.bool), grid=(2, 1, 2),
    )
    targets.valid[0, 2, 0] = True  # query token 0 of view 1 -> token 0 of view 0
    k = torch.zeros(1, 1, 4, 1)
    k[0, 0, 0, 0], k[0, 0, 1, 0] = -logit_gap / 2, logit_gap / 2
    tap = TapResult(q=torch.ones(1, 1, 1, 1), k=k, scale=1.0, grid=(2, 1, 2), query_idx=torch.tensor([[2]]))
    return tap, targets


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_log_eps_zero_is_exact_and_positive_is_the_released_log(loss):
    gap = 20.0
    p = 1 / (1 + math.exp(gap))  # 2.1e-9: below the released 1e-8
    tap, targets = one_pair_problem(gap)
    exact, _ = CameoLoss(1, head="mean", loss=loss)(tap, targets, num_ref=1)
    released, _ = CameoLoss(1, head="mean", loss=loss, log_eps=1e-8)(tap, targets, num_ref=1)
    torch.testing.assert_close(exact, torch.tensor(-math.log(p)), rtol=1e-6, atol=0)  # one-hot: kl = ce
    torch.testing.assert_close(released, torch.tensor(-math.log(p + 1e-8)), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="log_eps"):
        CameoLoss(1, log_eps=-1e-8)


# ------------------------------------------------------------------------- DDP count hook
def test_reduce_counts_hook_makes_ranks_average_to_the_global_mean(problem):
    """Two simulated ranks, one sample each: with the hook returning the summed counts and world
    2, the mean of the rank losses and of their gradients (what DDP's all-reduce gives) equals
    the one-process loss over both samples. The hook runs once per training forward only."""
    q_full, k_all, targets, _ = problem
    opts = dict(DEFAULT, normalization="global")
    full = CameoLoss(H, **opts)
    randomise_head(full)
    query_idx = torch.arange(N).expand(B, N)
    leaves = [q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True)]
    want, _ = full(tap_for(*leaves, query_idx), targets, NUM_REF)
    want_grads = torch.autograd.grad(want, [*leaves, *full.parameters()])

    shards = [targets.select(slice(b, b + 1)) for b in range(B)]
    with torch.no_grad():  # each rank's local counts, as the all-reduce would sum them
        local = [torch.stack([d["pairs_ref"], d["pairs_tgt"]]).float()
                 for d in (full(TapResult(q=q_full[b:b + 1], k=k_all[b:b + 1], scale=D**-0.5, grid=(V, h, w),
                                          query_idx=query_idx[b:b + 1]), shards[b], NUM_REF)[1] for b in range(B))]
    calls = []

    def reduce_counts(counts):
        calls.append(counts.clone())
        return local[0] + local[1], 2

    ranks = []
    for b in range(B):
        rank = CameoLoss(H, **opts, reduce_counts=reduce_counts)
        rank.load_state_dict(full.state_dict())
        rank_leaves = [q_full[b:b + 1].clone().requires_grad_(True), k_all[b:b + 1].clone().requires_grad_(True)]
        value, _ = rank(TapResult(q=rank_leaves[0], k=rank_leaves[1], scale=D**-0.5, grid=(V, h, w),
                                  query_idx=query_idx[b:b + 1]), shards[b], NUM_REF)
        ranks.append((value, torch.autograd.grad(value, [*rank_leaves, *rank.parameters()])))
        torch.testing.assert_close(calls[-1], local[b], atol=0, rtol=0)
    assert len(calls) == B  # once per forward
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, want, atol=1e-6, rtol=1e-5)
    for i, g in enumerate(want_grads):
        if i < 2:  # q and k: each rank holds its own sample's rows
            got = torch.cat([ranks[0][1][i], ranks[1][1][i]]) / 2
        else:  # head parameters: DDP averages the ranks' gradients
            got = (ranks[0][1][i] + ranks[1][1][i]) / 2
        torch.testing.assert_close(got, g, atol=1e-6, rtol=1e-4)

    rank.eval()
    rank(tap_for(q_full, k_all, query_idx), targets, NUM_REF)
    assert len(calls) == B  # eval mode: local means, no collective


def test_single_process_hook_is_bit_identical_to_no_hook(problem):
    """In one process the engine may pass the hook (global = local counts, world 1): the value
    and the gradients must not change by a single bit."""
    q_full, k_all, targets, _ = problem
    results = []
    for hook in (None, lambda counts: (counts, 1)):
        cameo = CameoLoss(H, **dict(DEFAULT, head="linear"), reduce_counts=hook)
        randomise_head(cameo)
        leaves = [q_full.clone().requires_grad_(True), k_all.clone().requires_grad_(True)]
        value, _ = cameo(tap_for(*leaves, torch.arange(N).expand(B, N)), targets, NUM_REF)
        results.append((value, torch.autograd.grad(value, [*leaves, *cameo.parameters()])))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_targets_cost_is_validated_and_travels():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4, (2, 8, 2, 1), generator=g)
    valid = torch.rand(2, 8, 2, generator=g) > 0.5
    cost = torch.rand(2, 8, 2, generator=g)
    t = CorrespondenceTargets(idx, torch.ones(2, 8, 2, 1), valid, (2, 2, 2), cost)
    assert t.to("cpu").cost is not None and torch.equal(t.to("cpu").cost, cost)
    assert torch.equal(t.select(slice(1, 2)).cost, cost[1:2])
    assert CorrespondenceTargets(idx, torch.ones(2, 8, 2, 1), valid, (2, 2, 2)).cost is None
    with pytest.raises(ValueError, match="cost"):
        CorrespondenceTargets(idx, torch.ones(2, 8, 2, 1), valid, (2, 2, 2), cost[:1])
    with pytest.raises(ValueError, match="cost"):
        CorrespondenceTargets(idx, torch.ones(2, 8, 2, 1), valid, (2, 2, 2), valid)


def test_sparse_path_refuses_a_second_backward(problem):
    """The sparse path scales its stored gradients in place, so a second backward through one
    graph would be wrong: it raises instead (the dense path supports it)."""
    q_full, k_all, targets, _ = problem
    query_idx = torch.arange(N).expand(B, N)
    for impl in ("sparse", "dense"):
        leaf = q_full.clone().requires_grad_(True)
        value, _ = CameoLoss(H, head="mean", impl=impl)(tap_for(leaf, k_all, query_idx), targets, NUM_REF)
        first = torch.autograd.grad(value, leaf, retain_graph=True)[0]
        if impl == "sparse":
            with pytest.raises(RuntimeError, match="one backward per forward"):
                torch.autograd.grad(value, leaf)
        else:
            torch.testing.assert_close(torch.autograd.grad(value, leaf)[0], first)
