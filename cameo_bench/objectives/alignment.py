"""The CAMEO attention-alignment loss (`CameoLoss`): a tap and sparse targets -> one scalar.

It supervises one layer's attention logits `q k^T * scale` with token correspondences without
ever storing the N x N map: the paper's map at layer 10 (4 views x 32x32 tokens, 10 heads) is
168 M logits per sample, and the MLP head widens it 4x; materialising it is what made the
official code need "VRAM issue" switches. Two implementations (`impl`), equal to the full-map
computation to 1e-5 for every option (tests/test_cameo_loss.py):
- `sparse` (the default): a term needs only the log-sum-exp of the fused logits over its block
  and their value at the few target tokens, and its gradient w.r.t. the logits is
  `alpha * softmax + beta` with beta nonzero only at the targets (`alignment_sparse.py` has the
  algebra for every loss and target). For the heads linear in the per-head logits (`mean`,
  `linear`, `per_head`) the head folds into the query, so a chunk is one matmul, one softmax and
  two gradient matmuls with no autograd graph (flash-attention style: no logit map beyond the
  chunk's block); the `mlp` head runs on each chunk's logits and only it is differentiated by
  autograd. Under `per_view` normalisation every supervised (query, key view) pair is one row
  against its key view's h*w keys, so invalid pairs cost nothing. Gradients are computed in the
  forward; the backward only scales them (the loss is a scalar).
- `dense`: the literal computation, kept as the reference and to reproduce earlier runs bit for
  bit: each chunk's logits -> head -> log-softmax -> dense target rows -> loss, differentiated as
  soon as it is computed (`backward="fused"`: activations freed before the next chunk, no
  recomputation), with `torch.utils.checkpoint` (`"checkpoint"`: recomputes each chunk in the
  backward), or keeping every chunk's graph (`"autograd"`, reference only, O(Qs x N)).
`impl="auto"` runs `sparse`, or `dense` when `backward` asks for a mode only it has. Peak memory
is O(chunk x N) plus O(N x H x d) either way. With `onehot_global`, `mlp`, `pointmap_nn` targets
and `log_eps=1e-8` the value is the released code's (tests/test_cameo_released.py). Queries of one
view form a group, and groups of the same shape are scored together (`alignment_plan.py`, planned
once per query layout, no host round trip per group). A `dense` chunk holds `chunk_size` query
rows summed over the groups it stacks; a `sparse` chunk at most `chunk_size` rows per block and
a logit block of at most 2 MB (`alignment_sparse.BLOCK_ELEMENTS`).

Definitions (one term per valid (query x, key view j) pair; `cameo_method.md`):
- support of query view i: key views j != i, restricted to references when `key_views="references"`.
- `per_view` normalisation: softmax over the h*w keys of view j; `global`: one softmax over all
  keys of the support, and the pair's term compares that whole row with the target placed in view j.
- targets: `onehot_per_view` (paper) one-hot in every valid view; `onehot_global` (released code)
  one-hot only in the support view holding the nearest match, the other valid rows are all-zero
  but still counted in the mean; `soft` the target weights renormalised over k.
- losses on a row (prediction a, target t): `ce` -sum t log a; `kl` sum t log(t/a); `l1` sum |a - t|.
  `log_eps` 0 takes log a from the exact log-softmax; > 0 takes log(a + log_eps) on the softmax
  probabilities instead, as the released code does with 1e-8 (kept to reproduce it: it caps a
  row's loss at -log(log_eps) and fades the gradient of a target whose probability is below it).
- the value is mean over reference-query terms + mean over target-query terms, unweighted
  (the training step applies lambda, as in REPA). Under DDP the means must run over the global
  batch: `reduce_counts` (a hook, called once per training forward with the local term counts)
  returns the global counts and the world size, and each group is scaled by world / global count
  so that DDP's gradient average gives the global mean.
- the `acc` diagnostic: share of supervised pairs whose target token holds the largest fused
  logit of its key view (the argmax; `sparse` counts an exact tie as a hit, `dense` takes the
  first tied token).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from backbones.interface import TapResult
from cameo_bench.config.spec import CAMEO_IMPLS as IMPLS
from cameo_bench.config.spec import HEADS, KEY_VIEWS, LOSSES, NORMALIZATIONS, QUERY_VIEWS, TARGETS
from cameo_bench.correspondence.targets import CorrespondenceTargets
from cameo_bench.objectives.alignment_onehot import run_onehot
from cameo_bench.objectives.alignment_sparse import Fold, MlpHead, run_pairs, run_plan, sparse_target_loss
from cameo_bench.objectives.alignment_plan import block_layout, build_plan, from_rows, groups_of, row_grads

QUERY_SAMPLING = ("all", "per_view")
BACKWARD_MODES = ("fused", "checkpoint", "autograd")
KERNELS = ("torch", "triton")  # triton: alignment_triton.py, tested under its interpreter only

# (local term counts [2] float: reference queries, target queries) -> (global counts [2], world size)
ReduceCounts = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown CAMEO {kind} {value!r}; valid: {list(valid)}")


class _GradBuffers:
    """Gradients accumulated chunk by chunk during the fused forward: the head's parameters over
    the whole forward, q and k of the stack being scored (`begin`)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.param_grads = [torch.zeros_like(p) for p in self.params]
        self.q = self.k = None

    def begin(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.q = torch.zeros_like(q) if q.requires_grad else None
        self.k = torch.zeros_like(k) if k.requires_grad else None

    def add(self, loss: torch.Tensor, q_leaf: torch.Tensor, k_leaf: torch.Tensor):
        leaves = [t for t in (q_leaf, k_leaf) if t.requires_grad] + self.params
        found = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
        gq = next(found) if q_leaf.requires_grad else None
        gk = next(found) if k_leaf.requires_grad else None
        for acc, grad in zip(self.param_grads, found):
            if grad is not None:
                acc += grad
        return gq, gk


class _FusedChunks(torch.autograd.Function):
    """Computes the loss and, chunk by chunk, its gradients in the forward; backward only scales
    them by the incoming gradient (the loss is a scalar). Every chunk's activations live only
    while that chunk is processed, and nothing is recomputed. No double backward."""

    @staticmethod
    def forward(ctx, module, work, scale, q, k, *params):
        grads = _GradBuffers(list(params))
        grad_q, grad_k = row_grads(q, k, q.requires_grad, k.requires_grad)
        results = []
        with torch.enable_grad():
            for stack, stack_targets in work:
                q_stack, k_stack = (t.detach().requires_grad_(src.requires_grad)
                                    for t, src in zip(stack.gather(q.detach(), k.detach()), (q, k)))
                grads.begin(q_stack, k_stack)
                results.append(module._chunks(q_stack, k_stack, *stack_targets, scale, grads))
                stack.add_grads(grad_q, grad_k, grads.q, grads.k)
        sums = module._sum_stacks(results)
        ctx.param_mask = [p.requires_grad for p in params]
        ctx.save_for_backward(from_rows(grad_q, q), from_rows(grad_k, k), *grads.param_grads)
        ctx.mark_non_differentiable(*sums[1:])
        return tuple(t.detach() for t in sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *_):
        gq, gk, *gp = ctx.saved_tensors
        scaled = iter(g * grad_total for g in gp)
        param_grads = [next(scaled) if needed else None for needed in ctx.param_mask]
        return (None, None, None,
                None if gq is None else gq * grad_total, None if gk is None else gk * grad_total, *param_grads)


# Above this many (sample, query, key) triples per step the general per-pair path (`run_pairs`) scores
# the one-hot CE as well: at the paper's layer-10 shape (16.8 M) it is as fast as `run_onehot` (0.40 s
# on one CPU thread, forward + backward) with less memory (46-51 MB peak extra vs 59-66 MB: run_onehot
# lays the queries out per key block), while at the tiny presets (<= 0.3 M) `run_onehot`'s fewer
# operations are what keeps the loss near 2% of a step.
ONEHOT_MAX_LOGITS = 1 << 22


def _drop_dead_head_bias(state_dict, prefix, *args) -> None:
    """Checkpoints written before the `mlp` head lost its last bias still load: that bias never
    changed the loss (the softmax ignores a constant logit shift), so dropping it is exact."""
    state_dict.pop(prefix + "head.2.bias", None)


class CameoLoss(nn.Module):
    """Alignment loss with its learnable logit head (an `nn.Module` so the optimizer sees it).

    `queries_per_view=None` supervises every query token; an integer samples that many tokens per
    supervised query view, valid ones first (`select_queries`, called before the forward so the tap
    only gathers those rows). `chunk_size` bounds the query rows scored at once; `impl` picks the
    implementation (`sparse`, `dense`, or `auto`), `backward` how the `dense` path bounds memory,
    `log_eps` the log of the loss and `reduce_counts` the DDP normalisation (see the module
    docstring). `kernel="triton"` scores the one-hot per-view CE of the mean and linear
    heads with the Triton kernels of `alignment_triton` (not used by the engine: no GPU has run it).

    The `mlp` head's last layer has no bias: the softmax over keys ignores a constant added to
    every logit, so a bias would be a parameter whose gradient is exactly zero.
    """

    def __init__(
        self,
        num_heads: int,
        head: str = "mlp",
        normalization: str = "per_view",
        target: str = "onehot_per_view",
        loss: str = "ce",
        query_views: str = "both",
        key_views: str = "all_but_self",
        query_sampling: str | None = None,
        queries_per_view: int | None = None,
        chunk_size: int = 128,
        backward: str = "fused",
        log_eps: float = 0.0,
        reduce_counts: ReduceCounts | None = None,
        impl: str = "auto",
        kernel: str = "torch",
    ):
        super().__init__()
        if query_sampling is None:
            query_sampling = "all" if queries_per_view is None else "per_view"
        for kind, value, valid in (
            ("head", head, HEADS), ("normalization", normalization, NORMALIZATIONS),
            ("target", target, TARGETS), ("loss", loss, LOSSES), ("query_views", query_views, QUERY_VIEWS),
            ("key_views", key_views, KEY_VIEWS), ("query_sampling", query_sampling, QUERY_SAMPLING),
            ("backward", backward, BACKWARD_MODES), ("impl", impl, IMPLS),
        ):
            _check_choice(kind, value, valid)
        if kernel not in KERNELS:
            raise ValueError(f"unknown CAMEO kernel {kernel!r}; valid: {list(KERNELS)}")
        if kernel == "triton" and not (head in ("mean", "linear") and normalization == "per_view" and loss != "l1"
                                       and target != "soft" and log_eps == 0 and impl != "dense" and backward == "fused"):
            raise ValueError("CAMEO kernel 'triton' scores the one-hot per-view CE of one fused map: it needs head "
                             "'mean' or 'linear', normalization 'per_view', a one-hot target, loss 'ce' or 'kl', "
                             "log_eps 0 and the sparse path; use kernel 'torch' for the others")
        if impl == "sparse" and backward != "fused":
            raise ValueError(f"CAMEO backward={backward!r} is a mode of impl 'dense'; impl 'sparse' computes "
                             f"its gradients in the forward (backward 'fused')")
        if (query_sampling == "per_view") != (queries_per_view is not None):
            raise ValueError(
                f"query_sampling={query_sampling!r} needs queries_per_view "
                f"{'set' if query_sampling == 'per_view' else 'None'}, got {queries_per_view}"
            )
        if queries_per_view is not None and queries_per_view < 1:
            raise ValueError(f"queries_per_view must be >= 1, got {queries_per_view}")
        if num_heads < 1 or chunk_size < 1:
            raise ValueError(f"num_heads and chunk_size must be >= 1, got {num_heads}, {chunk_size}")
        if not log_eps >= 0:  # also rejects NaN
            raise ValueError(f"log_eps must be >= 0 (0 = exact log-softmax, 1e-8 = released code), got {log_eps}")
        self.num_heads, self.head_mode, self.normalization = num_heads, head, normalization
        self.target, self.loss, self.query_views, self.key_views = target, loss, query_views, key_views
        self.query_sampling, self.queries_per_view = query_sampling, queries_per_view
        self.chunk_size, self.backward_mode = chunk_size, backward
        self.log_eps, self.reduce_counts = float(log_eps), reduce_counts
        self.impl, self.kernel = impl, kernel
        self._supports: dict = {}  # (num_ref, V, device) -> [V, V] support
        self._layouts: dict = {}  # (Qs, grid, num_ref, device) -> view of every query position, or None
        self._plans: dict = {}  # (B, Qs, grid, num_ref, device) -> Plan of that block layout
        if head == "linear":  # starts as the head mean, so switching heads changes nothing at step 0
            self.head_weight = nn.Parameter(torch.full((num_heads,), 1.0 / num_heads))
        elif head == "mlp":  # CAMEO's HeadMlp_Softmax: H -> 4H -> 1 per (query, key) pair
            self.head = nn.Sequential(
                nn.Linear(num_heads, 4 * num_heads), nn.GELU(), nn.Linear(4 * num_heads, 1, bias=False)
            )
            self._register_load_state_dict_pre_hook(_drop_dead_head_bias)

    # ---------------------------------------------------------------- which views are supervised
    def _query_view_ids(self, num_ref: int, num_views: int) -> list[int]:
        refs, tgts = list(range(num_ref)), list(range(num_ref, num_views))
        return {"references": refs, "targets": tgts, "both": refs + tgts}[self.query_views]

    def _support(self, num_ref: int, num_views: int, device) -> torch.Tensor:  # [V, V] bool
        """support[i, j]: key view j is scored for queries of view i (never i itself)."""
        key = (num_ref, num_views, str(device))
        if key not in self._supports:
            self._supports[key] = self._make_support(num_ref, num_views, device)
        return self._supports[key]

    def _make_support(self, num_ref: int, num_views: int, device) -> torch.Tensor:
        views = torch.arange(num_views, device=device)
        support = views[:, None] != views[None, :]
        if self.key_views == "references":
            support &= views[None, :] < num_ref
        enabled = torch.zeros(num_views, dtype=torch.bool, device=device)
        enabled[self._query_view_ids(num_ref, num_views)] = True
        return support & enabled[:, None]

    @torch.no_grad()
    def select_queries(
        self, targets: CorrespondenceTargets, num_ref: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:  # [B, Qs] global token ids, grouped by view
        """Query tokens for `TapRequest(layer, query_idx)`, chosen before the forward.

        Per supervised query view: every token (`all`), or `queries_per_view` tokens drawn at
        random among those with at least one supervised valid pair, topped up with random other
        tokens of that view when too few are valid (they carry no term, but keep Qs fixed).
        """
        num_views, h, w = targets.grid
        hw, B = h * w, targets.valid.shape[0]
        device = targets.valid.device
        views = self._query_view_ids(num_ref, num_views)
        if self.query_sampling == "all" or not views:
            ids = [torch.arange(i * hw, (i + 1) * hw, device=device) for i in views]
            ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
            return ids.expand(B, -1).contiguous()
        support = self._support(num_ref, num_views, device)  # [V, V]
        token_view = torch.arange(num_views * hw, device=device) // hw  # [N]
        has_pair = (targets.valid & support[token_view][None]).any(-1)  # [B, N]
        n = min(self.queries_per_view, hw)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        chosen = []
        for i in views:
            noise = torch.rand(B, hw, generator=generator, device=gen_device).to(device)
            rank = noise - has_pair[:, i * hw:(i + 1) * hw].float()  # valid tokens sort first
            pick = rank.argsort(dim=1)[:, :n].sort(dim=1).values  # [B, n]
            chosen.append(pick + i * hw)
        return torch.cat(chosen, dim=1)

    # ------------------------------------------------------------------------------- forward
    @property
    def path(self) -> str:
        """The implementation `forward` runs: `sparse` unless asked for `dense` or a backward mode
        only `dense` has."""
        if self.impl != "auto":
            return self.impl
        return "sparse" if self.backward_mode == "fused" else "dense"

    def forward(
        self, tap: TapResult, targets: CorrespondenceTargets, num_ref: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the unweighted loss and detached diagnostics (pair counts, per-group losses,
        argmax accuracy within the key view)."""
        self._check_inputs(tap, targets, num_ref)
        device = tap.q.device
        with torch.autocast(device_type=device.type, enabled=False):
            q, k = tap.q.float(), tap.k.float()  # [B, H, Qs, d], [B, H, N, d]
            plan, per_query, counts, factors = self._plan(tap.query_idx.to(device), targets, num_ref)
            params = list(self.parameters())
            if not plan.stacks:  # a zero that depends on every input: "no valid pair" stays finite
                zero = (q.sum() + k.sum()) * 0.0 + sum(p.sum() * 0.0 for p in params)
                sums = (zero, q.new_zeros(2), q.new_zeros(()), q.new_zeros(()))
            elif self.path == "sparse":
                sums = self._run_sparse(q, k, plan, per_query, factors, tap.scale)
            else:
                sums = self._run_dense(q, k, plan, per_query, factors, tap.scale, params)
        total, losses, correct, scored = sums
        diagnostics = {
            "pairs_ref": counts[0], "pairs_tgt": counts[1],
            "loss_ref": losses[0].detach(), "loss_tgt": losses[1].detach(),
            "acc": (correct / scored.clamp_min(1)).detach(),
        }
        return total, diagnostics

    def _plan(self, query_idx, targets, num_ref):
        """(plan, per-query targets (pair_w, idx, weight), term counts (reference, target queries),
        per-group factors [2]): the groups of the layout, the sparse targets gathered once, and
        the 1 / (number of terms) of each query group, kept on the device."""
        num_views, h, w = targets.grid
        hw = h * w
        B, Qs = query_idx.shape
        device = query_idx.device
        query_view = query_idx // hw  # [B, Qs]
        support = self._support(num_ref, num_views, device)  # [V, V]
        pair_w, tgt_idx, tgt_w = self._pair_targets(targets, query_idx, query_view, support, hw)
        is_ref = query_view < num_ref  # [B, Qs]
        per_query = pair_w.sum(-1)  # [B, Qs]
        counts = ((per_query * is_ref).sum(), (per_query * ~is_ref).sum())  # reference, target terms
        totals, world = torch.stack(counts), 1
        if self.reduce_counts is not None and self.training:  # every rank, every forward: a collective
            totals, world = self.reduce_counts(totals.float())
        factors = torch.where(totals > 0, world / totals.clamp_min(1), 0.0).float()  # [2]
        views = self._query_view_ids(num_ref, num_views)
        key = (B, Qs, tuple(targets.grid), num_ref, str(device))
        layout = self._layouts.get(key[1:])
        if layout is None:
            layout = self._layouts[key[1:]] = block_layout(views, Qs, device)
        if layout is not None and bool((query_view == layout).all()):  # one small read back
            plan = self._plans.get(key)
            if plan is None:
                rows, per_view = torch.arange(B, device=device), Qs // len(views)
                groups = [(rows, torch.arange(i * per_view, (i + 1) * per_view, device=device), view)
                          for i, view in enumerate(views)]
                plan = self._plans[key] = build_plan(groups, support, num_ref, B, Qs, targets.grid)
        else:  # a hand-made layout: planned from the ids themselves
            plan = build_plan(list(groups_of(query_view)), support, num_ref, B, Qs, targets.grid)
        return plan, (pair_w, tgt_idx, tgt_w, (~is_ref).long()), counts, factors

    def _run_sparse(self, q, k, plan, per_query, factors, scale):
        """The sparse-target path (`alignment_sparse`): linear heads folded into the query (no
        logit map), the MLP head on per-chunk logits."""
        head, mix, head_params = None, None, []
        if self.head_mode in ("per_head", "mlp"):  # H maps of width d
            fold = Fold("heads", scale)
            if self.head_mode == "mlp":
                head, head_params = MlpHead(self.head[0], self.head[2]), list(self.parameters())
        else:  # one map of width H*d: z = (scale * w ⊙ Q) . K
            mix = self.head_weight if self.head_mode == "linear" else q.new_full((q.shape[1],), 1.0 / q.shape[1])
            fold = Fold("concat", scale, mix.float() if self.head_mode == "linear" else mix)
        num_out = self.num_heads if self.head_mode == "per_head" else 1
        options = dict(loss=self.loss, log_eps=self.log_eps, head=head)
        if self.normalization == "per_view":  # one row per supervised pair (`run_pairs`)
            pair_w, idx, weight, group = per_query
            w = pair_w * (factors[group] / num_out)[..., None]  # [B, Qs, V] term weights
            small = q.shape[0] * q.shape[2] * k.shape[2] <= ONEHOT_MAX_LOGITS
            scorer = run_onehot if self._onehot_rows and small else run_pairs
            run = partial(scorer, idx=idx, t=weight, w=w, group=group, chunk=self.chunk_size, kernel=self.kernel,
                          **options)
        else:  # one softmax over every supported key: whole query rows, stacked by layout
            work = [(stack, *self._weighted(stack, per_query, factors, num_out), self.chunk_size)
                    for stack in plan.stacks]
            run = partial(run_plan, work=work, per_view=False, **options)
        return sparse_target_loss(q, k, fold, run, mix if self.head_mode == "linear" else None, head_params)

    @property
    def _onehot_rows(self) -> bool:
        """The options `alignment_onehot.run_onehot` scores (the quickstart's among them); it runs
        when the step also has at most `ONEHOT_MAX_LOGITS` (sample, query, key) triples."""
        return (self.head_mode in ("mean", "linear", "per_head") and self.normalization == "per_view"
                and self.target != "soft" and self.loss in ("ce", "kl") and self.log_eps == 0 and self.kernel == "torch")

    @staticmethod
    def _weighted(stack, per_query, factors, num_out):
        """The stack's idx, weight and term weights: pair weight x (1 / terms of the row's group) / Ho."""
        idx, weight, pair_w = stack.targets(*per_query[:3])
        return idx, weight, pair_w * (factors[stack.group_of_row] / num_out)[:, None, None]

    def _run_dense(self, q, k, plan, per_query, factors, scale, params):
        """The literal path: logits -> head -> log-softmax -> dense target rows per chunk, in
        `backward` mode."""
        num_out = self.num_heads if self.head_mode == "per_head" else 1
        fused = self.backward_mode == "fused" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, *params))
        work = [(stack, (*stack.targets(*per_query[:3]), factors[stack.group_of_row] / num_out, stack.group_ids))
                for stack in plan.stacks]
        if fused:
            return _FusedChunks.apply(self, work, scale, q, k, *params)
        # [G*b, H, P, d], [G*b, H, Vk*hw, d] per stack, through autograd
        return self._sum_stacks(self._chunks(*stack.gather(q, k), *stack_targets, scale) for stack, stack_targets in work)

    @staticmethod
    def _sum_stacks(results):
        total = losses = correct = scored = None
        for t, l, c, s in results:
            if total is None:
                total, losses, correct, scored = t, l, c, s
            else:
                total, losses, correct, scored = total + t, losses + l, correct + c, scored + s
        return total, losses, correct, scored

    def _chunks(self, q, k, tgt_idx, tgt_w, pair_w, row_factor, group_ids, scale,
                grads: _GradBuffers | None = None):
        """One stack's chunks: q [R, H, P, d], k [R, H, Nk, d] -> (total, losses [2], correct, scored).

        `row_factor` [R] is each row's 1 / (terms in its query group) / Ho; it multiplies each
        group's sum, so one group per stack gives the numbers of scoring the groups one by one.

        With `grads` (fused mode, inside `_FusedChunks.forward`, q and k are leaves) every chunk is
        differentiated right away into the buffers and its graph freed, so nothing waits for the
        backward pass.
        """
        k_prep = self._prepare_keys(k)
        if grads is not None:
            k_leaf = k_prep.detach().requires_grad_(k.requires_grad)
            grad_k_prep = torch.zeros_like(k_prep) if k.requires_grad else None
        losses = [q.new_zeros(()), q.new_zeros(())]
        correct, scored = q.new_zeros(()), q.new_zeros(())
        num_groups = len(group_ids)
        size = max(1, self.chunk_size // num_groups)
        samples = q.shape[0] // num_groups
        for start in range(0, q.shape[2], size):
            end = start + size
            args = (q[:, :, start:end], k_prep, tgt_idx[:, start:end], tgt_w[:, start:end], pair_w[:, start:end], scale)
            group_sums = lambda out: [  # noqa: E731  per group: sum of its weighted terms x its factor
                out[0][g * samples:(g + 1) * samples].sum() * row_factor[g * samples] for g in range(num_groups)]
            if grads is not None:
                q_leaf = args[0].detach().requires_grad_(q.requires_grad)
                out = self._chunk(q_leaf, k_leaf, *args[2:])
                sums = group_sums(out)
                gq, gk = grads.add(sum(sums[1:], sums[0]), q_leaf, k_leaf)
                if gq is not None:
                    grads.q[:, :, start:end] += gq
                if gk is not None:
                    grad_k_prep += gk
                sums = [s.detach() for s in sums]
            else:
                if self.backward_mode == "checkpoint" and torch.is_grad_enabled():
                    out = checkpoint(self._chunk, *args, use_reentrant=False, preserve_rng_state=False)
                else:
                    out = self._chunk(*args)
                sums = group_sums(out)
            for g, s in zip(group_ids, sums):
                losses[g] = losses[g] + s
            correct, scored = correct + out[1], scored + out[2]
        if grads is not None and grad_k_prep is not None:  # through the key preparation, into k
            grads.k += torch.autograd.grad(k_prep, k, grad_k_prep)[0]
        return losses[0] + losses[1], torch.stack(losses), correct, scored

    def _check_inputs(self, tap: TapResult, targets: CorrespondenceTargets, num_ref: int) -> None:
        if tuple(tap.grid) != tuple(targets.grid):
            raise ValueError(f"tap grid {tap.grid} (layer {tap.layer!r}) != targets grid {targets.grid}")
        B, H, Qs, _ = tap.q.shape
        num_views, h, w = tap.grid
        if H != self.num_heads:
            raise ValueError(f"tap of layer {tap.layer!r} has {H} heads, CameoLoss was built for {self.num_heads}")
        if tuple(tap.k.shape[:3]) != (B, H, num_views * h * w):
            raise ValueError(f"tap k {tuple(tap.k.shape)} does not match q {tuple(tap.q.shape)} and grid {tap.grid}")
        if tuple(tap.query_idx.shape) != (B, Qs):
            raise ValueError(f"tap query_idx {tuple(tap.query_idx.shape)} != (B, Qs) = {(B, Qs)}")
        if targets.valid.shape[0] != B:
            raise ValueError(f"targets batch {targets.valid.shape[0]} != tap batch {B}")
        if not 0 <= num_ref <= num_views:
            raise ValueError(f"num_ref={num_ref} outside [0, {num_views}]")

    def _pair_targets(self, targets, query_idx, query_view, support, hw):
        """Per selected query: which (query, key view) terms count and their sparse target rows.

        Returns pair_w [B, Qs, V] float, idx [B, Qs, V, k] long (clamped into the view) and
        weight [B, Qs, V, k] float, zero wherever the row is not a target.
        """
        B = query_idx.shape[0]
        rows = torch.arange(B, device=query_idx.device)[:, None]
        valid = targets.valid.to(query_idx.device)[rows, query_idx]  # [B, Qs, V]
        idx = targets.idx.to(query_idx.device)[rows, query_idx]  # [B, Qs, V, k]
        weight = targets.weight.to(query_idx.device, torch.float32)[rows, query_idx]  # [B, Qs, V, k]
        sup = support[query_view]  # [B, Qs, V]
        pair = valid & sup
        if (((idx < 0) | (idx >= hw)) & pair[..., None]).any():
            raise ValueError(f"valid correspondence targets hold token ids outside [0, {hw})")
        if self.target == "soft":
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-12)
        elif idx.shape[-1] == 1:  # one-hot, one entry
            weight = torch.ones_like(weight)
        else:  # one-hot at the heaviest entry
            best = weight.argmax(-1, keepdim=True)  # [B, Qs, V, 1]
            idx, weight = idx.gather(-1, best), torch.ones_like(best, dtype=torch.float32)
        if self.target == "onehot_global":
            weight = weight * self._nearest_view_mask(targets, query_idx, valid, sup)[..., None]
        weight = weight * pair[..., None]
        return pair.float(), idx.clamp(0, hw - 1), weight

    def _nearest_view_mask(self, targets, query_idx, valid, sup) -> torch.Tensor:  # [B, Qs, V]
        """The one key view that gets the target under `onehot_global`.

        The released code takes the argmax of the 3D match cost over all supported key views
        jointly, valid or not. If the targets carry `cost [B, N, V]` (distance of the best match in
        view j, lower is nearer; `pointmap_nn`, `depth`) that rule is reproduced exactly; without
        it (`matches`, `epipolar`) the first valid supported view (references come first) stands
        in for the nearest one.
        """
        cost = targets.cost
        if cost is not None:
            rows = torch.arange(query_idx.shape[0], device=query_idx.device)[:, None]
            cost = cost.to(query_idx.device, torch.float32)[rows, query_idx]  # [B, Qs, V]
            winner = cost.masked_fill(~sup, float("inf")).argmin(-1)
        else:
            winner = (valid & sup).int().argmax(-1)  # first True; rows without any are unused
        return F.one_hot(winner, sup.shape[-1]).bool() & sup

    def _prepare_keys(self, k: torch.Tensor) -> torch.Tensor:
        """mean/linear heads are linear in the per-head logits, so they fold into one matmul over
        (head, dim): the chunk never holds H separate maps."""
        if self.head_mode in ("mean", "linear"):
            return rearrange(k, "b H n d -> b (H d) n")
        return k

    def _head_logits(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, H, c, d] with prepared keys -> fused logits [B, Ho, c, Nk] (Ho = H for per_head)."""
        if self.head_mode in ("mean", "linear"):
            mix = self.head_weight if self.head_mode == "linear" else q.new_full((q.shape[1],), 1.0 / q.shape[1])
            q_mix = rearrange(q * (mix.float() * scale)[None, :, None, None], "b H c d -> b c (H d)")
            return torch.bmm(q_mix, k)[:, None]  # [B, 1, c, Nk]
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, c, Nk]
        if self.head_mode == "per_head":
            return logits
        # MLP over the head axis, kept channels-first so each layer is one GEMM over all pairs.
        B, H, c, n = logits.shape
        lin1, lin2 = self.head[0], self.head[2]
        x = logits.reshape(B, H, c * n)
        hidden = torch.baddbmm(lin1.bias.float()[None, :, None], lin1.weight.float().expand(B, -1, -1), x)
        hidden = F.gelu(hidden)  # [B, 4H, c*n]
        out = torch.bmm(lin2.weight.float().expand(B, -1, -1), hidden)  # [B, 1, c*n]
        return out.view(B, 1, c, n)

    def _chunk(self, q, k, tgt_idx, tgt_w, pair_w, scale: float):
        """Weighted terms of one chunk of queries [R, Ho, c, Vk]; also (correct, scored) counts.

        q [R, H, c, d]; k prepared keys of the Vk supported views; tgt_idx / tgt_w [R, c, Vk, k];
        pair_w [R, c, Vk].
        """
        num_key_views = tgt_idx.shape[2]
        logits = self._head_logits(q, k, scale)  # [B, Ho, c, Vk*hw]
        logits = rearrange(logits, "b o c (v n) -> b o c v n", v=num_key_views)
        if self.normalization == "per_view":
            logp = logits.log_softmax(-1)
        else:
            logp = rearrange(
                rearrange(logits, "b o c v n -> b o c (v n)").log_softmax(-1),
                "b o c (v n) -> b o c v n", v=num_key_views,
            )
        log_pred = logp if self.log_eps == 0 else (logp.exp() + self.log_eps).log()  # released: log(p + eps)
        hw = logits.shape[-1]
        target = torch.zeros(pair_w.shape + (hw,), device=q.device)  # [R, c, Vk, hw]
        target = target.scatter_add_(-1, tgt_idx, tgt_w)[:, None]  # [B, 1, c, Vk, hw]
        if self.loss == "ce":
            term = -(target * log_pred).sum(-1)
        elif self.loss == "kl":
            term = (torch.xlogy(target, target) - target * log_pred).sum(-1)
        else:
            prob = logp.exp()
            term = (prob - target).abs().sum(-1)  # [B, Ho, c, Vk]
            if self.normalization == "global":  # mass on the other views' keys counts too
                term = term + prob.sum((-2, -1))[..., None] - prob.sum(-1)
        num_out = term.shape[1]
        weighted = term * pair_w[:, None]  # [R, Ho, c, Vk]
        with torch.no_grad():
            has_target = (target.sum(-1) > 0) & (pair_w[:, None] > 0)  # [R, 1, c, Vk]
            hit = (logits.argmax(-1) == target.argmax(-1)) & has_target
            correct = hit.sum().float() / num_out
            scored = has_target.sum().float()
        return weighted, correct, scored
