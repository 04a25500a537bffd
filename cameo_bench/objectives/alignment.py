"""The CAMEO attention-alignment loss (`CameoLoss`): a tap and sparse targets -> one scalar.

It supervises one layer's attention logits `q k^T * scale` with token correspondences without
ever storing the N x N map: the paper's map at layer 10 (4 views x 32x32 tokens, 10 heads) is
168 M logits per sample, and the MLP head widens it 4x; materialising it is what made the
official code need "VRAM issue" switches. Here queries are processed in chunks that each lie in
one query view, and only the supervised key views are scored. Each chunk's logits -> head ->
softmax -> loss is differentiated as soon as it is computed (`backward="fused"`, the default): its
activations are freed before the next chunk and the backward pass only scales the stored
gradients, so peak memory is O(chunk x N) with no recomputation. `backward="checkpoint"` does the
same with `torch.utils.checkpoint` (recomputes each chunk in the backward); `"autograd"` keeps
every chunk's graph (reference only, O(Qs x N)). All three equal the full-map computation
(tests/test_cameo_loss.py); with `onehot_global`, `mlp`, `pointmap_nn` targets and
`log_eps=1e-8` the value is the released code's (tests/test_cameo_released.py).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from backbones.interface import TapResult
from cameo_bench.config.spec import HEADS, KEY_VIEWS, LOSSES, NORMALIZATIONS, QUERY_VIEWS, TARGETS
from cameo_bench.correspondence.targets import CorrespondenceTargets

QUERY_SAMPLING = ("all", "per_view")
BACKWARD_MODES = ("fused", "checkpoint", "autograd")

# (local term counts [2] float: reference queries, target queries) -> (global counts [2], world size)
ReduceCounts = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown CAMEO {kind} {value!r}; valid: {list(valid)}")


@dataclass
class _Group:
    """Queries of one view (for a batch selector) and the key views they are scored against."""

    bsel: slice
    pos: torch.Tensor  # [P] positions in the tap's query axis
    keys: list[int]  # supported key views
    group: int  # 0 reference queries, 1 target queries
    factor: float  # 1 / number of terms in that query group (world / global count under DDP)
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # idx, weight [b, P, Vk, k], pair_w [b, P, Vk]
    chunks: list[tuple[int, int]]  # [start, end) ranges over P holding at least one term


class _GradBuffers:
    """Gradients accumulated chunk by chunk during the fused forward."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, params: list[nn.Parameter]):
        self.q = torch.zeros_like(q) if q.requires_grad else None
        self.k = torch.zeros_like(k) if k.requires_grad else None
        self.params = [p for p in params if p.requires_grad]
        self.param_grads = [torch.zeros_like(p) for p in self.params]

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
    def forward(ctx, module, groups, scale, num_views, q, k, *params):
        grads = _GradBuffers(q, k, list(params))
        with torch.enable_grad():
            k_graph = k.detach().requires_grad_(k.requires_grad)
            sums = module._run(q.detach().requires_grad_(q.requires_grad), k_graph, groups, scale, num_views, grads)
        ctx.param_mask = [p.requires_grad for p in params]
        ctx.save_for_backward(grads.q, grads.k, *grads.param_grads)
        ctx.mark_non_differentiable(*sums[1:])
        return tuple(t.detach() for t in sums)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, *_):
        gq, gk, *gp = ctx.saved_tensors
        scaled = iter(g * grad_total for g in gp)
        param_grads = [next(scaled) if needed else None for needed in ctx.param_mask]
        return (None, None, None, None,
                None if gq is None else gq * grad_total, None if gk is None else gk * grad_total, *param_grads)


def _drop_dead_head_bias(state_dict, prefix, *args) -> None:
    """Checkpoints written before the `mlp` head lost its last bias still load: that bias never
    changed the loss (the softmax ignores a constant logit shift), so dropping it is exact."""
    state_dict.pop(prefix + "head.2.bias", None)


class CameoLoss(nn.Module):
    """Alignment loss with its learnable logit head (an `nn.Module` so the optimizer sees it).

    `queries_per_view=None` supervises every query token; an integer samples that many tokens per
    supervised query view, valid ones first (`select_queries`, called before the forward so the tap
    only gathers those rows). `chunk_size` is the number of query rows scored at once;
    `backward` picks how memory is bounded, `log_eps` the log of the loss and `reduce_counts`
    the DDP normalisation (see the module docstring).

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
    ):
        super().__init__()
        if query_sampling is None:
            query_sampling = "all" if queries_per_view is None else "per_view"
        for kind, value, valid in (
            ("head", head, HEADS), ("normalization", normalization, NORMALIZATIONS),
            ("target", target, TARGETS), ("loss", loss, LOSSES), ("query_views", query_views, QUERY_VIEWS),
            ("key_views", key_views, KEY_VIEWS), ("query_sampling", query_sampling, QUERY_SAMPLING),
            ("backward", backward, BACKWARD_MODES),
        ):
            _check_choice(kind, value, valid)
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
    def forward(
        self, tap: TapResult, targets: CorrespondenceTargets, num_ref: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the unweighted loss and detached diagnostics (pair counts, per-group losses,
        argmax accuracy within the key view)."""
        self._check_inputs(tap, targets, num_ref)
        device = tap.q.device
        with torch.autocast(device_type=device.type, enabled=False):
            q, k = tap.q.float(), tap.k.float()  # [B, H, Qs, d], [B, H, N, d]
            groups, counts = self._plan(tap.query_idx.to(device), targets, num_ref)
            params = list(self.parameters())
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, *params))
            if not groups:  # a zero that depends on every input: "no valid pair" stays finite
                zero = (q.sum() + k.sum()) * 0.0 + sum(p.sum() * 0.0 for p in params)
                sums = (zero, *(q.new_zeros(()) for _ in range(4)))
            elif self.backward_mode == "fused" and needs_grad:
                sums = _FusedChunks.apply(self, groups, tap.scale, targets.num_views, q, k, *params)
            else:
                sums = self._run(q, k, groups, tap.scale, targets.num_views)
        total, loss_ref, loss_tgt, correct, scored = sums
        diagnostics = {
            "pairs_ref": counts[0], "pairs_tgt": counts[1],
            "loss_ref": loss_ref.detach(), "loss_tgt": loss_tgt.detach(),
            "acc": (correct / scored.clamp_min(1)).detach(),
        }
        return total, diagnostics

    def _plan(self, query_idx, targets, num_ref) -> tuple[list[_Group], tuple[torch.Tensor, torch.Tensor]]:
        """Group the selected queries by view, gather their sparse targets once, list the chunks
        that hold at least one term, and count the terms of each query group."""
        num_views, h, w = targets.grid
        hw = h * w
        query_view = query_idx // hw  # [B, Qs]
        support = self._support(num_ref, num_views, query_idx.device)  # [V, V]
        pair_w, tgt_idx, tgt_w = self._pair_targets(targets, query_idx, query_view, support, hw)
        is_ref = query_view < num_ref  # [B, Qs]
        counts = tuple((pair_w.sum(-1) * m).sum() for m in (is_ref, ~is_ref))  # ref, tgt terms
        count_list = [float(c) for c in counts]
        factors = [1.0 / c if c else 0.0 for c in count_list]
        if self.reduce_counts is not None and self.training:  # every rank, every forward: a collective
            totals, world = self.reduce_counts(torch.stack([c.float() for c in counts]))
            factors = [world / float(t) if t else 0.0 for t in totals.tolist()]
        per_query_pairs = pair_w.sum(-1).cpu()  # [B, Qs]
        groups = []
        for bsel, pos, view in self._groups(query_view):
            keys = support[view].nonzero().flatten().tolist()
            group = 0 if view < num_ref else 1
            if not keys or count_list[group] == 0:
                continue
            pairs_here = per_query_pairs[bsel][:, pos.cpu()].sum(0).tolist()  # [P]
            chunks = [
                (start, start + self.chunk_size) for start in range(0, pos.numel(), self.chunk_size)
                if any(pairs_here[start:start + self.chunk_size])
            ]
            if chunks:
                sparse = tuple(t[bsel][:, pos][:, :, keys] for t in (tgt_idx, tgt_w, pair_w))
                groups.append(_Group(bsel, pos, keys, group, factors[group], sparse, chunks))
        return groups, counts

    def _run(self, q, k, groups, scale, num_views, grads: _GradBuffers | None = None):
        """Sum the chunk losses; returns (total, ref part, target part, correct, scored).

        With `grads` (fused mode, inside `_FusedChunks.forward`) every chunk is differentiated
        right away into the buffers and its graph freed, so nothing waits for the backward pass.
        """
        group_loss = [q.new_zeros(()), q.new_zeros(())]
        correct, scored = q.new_zeros(()), q.new_zeros(())
        for g in groups:
            k_group = self._prepare_keys(
                rearrange(
                    rearrange(k[g.bsel], "b H (v n) d -> b H v n d", v=num_views)[:, :, g.keys],
                    "b H v n d -> b H (v n) d",
                )
            )  # the supported key views only
            q_group = q[g.bsel][:, :, g.pos]  # [b, H, P, d]
            if grads is not None:
                k_leaf = k_group.detach().requires_grad_(k.requires_grad)
                grad_k_group = torch.zeros_like(k_group) if k.requires_grad else None
            for start, end in g.chunks:
                args = (q_group[:, :, start:end], k_group, *(t[:, start:end] for t in g.sparse), scale, g.factor)
                if grads is not None:
                    q_leaf = args[0].detach().requires_grad_(q.requires_grad)
                    out = self._chunk(q_leaf, k_leaf, *args[2:])
                    gq, gk = grads.add(out[0], q_leaf, k_leaf)
                    if gq is not None:
                        grads.q[g.bsel].index_add_(2, g.pos[start:end], gq)
                    if gk is not None:
                        grad_k_group += gk
                    out = (out[0].detach(), *out[1:])
                elif self.backward_mode == "checkpoint" and torch.is_grad_enabled():
                    out = checkpoint(self._chunk, *args, use_reentrant=False, preserve_rng_state=False)
                else:
                    out = self._chunk(*args)
                group_loss[g.group] = group_loss[g.group] + out[0]
                correct, scored = correct + out[1], scored + out[2]
            if grads is not None and grad_k_group is not None:  # through the key gather, into k
                grads.k += torch.autograd.grad(k_group, k, grad_k_group)[0]
        return group_loss[0] + group_loss[1], group_loss[0], group_loss[1], correct, scored

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
        if ((idx < 0) | (idx >= hw))[pair].any():
            raise ValueError(f"valid correspondence targets hold token ids outside [0, {hw})")
        if self.target == "soft":
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-12)
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

    @staticmethod
    def _groups(query_view: torch.Tensor):
        """(batch selector, query positions, view) with all chunks inside one query view.

        The engine's query ids are the same view layout for every sample, so groups span the whole
        batch; arbitrary per-sample layouts fall back to one sample at a time.
        """
        B = query_view.shape[0]
        if bool((query_view == query_view[:1]).all()):
            batch_selectors = [(slice(None), query_view[0])]
        else:
            batch_selectors = [(slice(b, b + 1), query_view[b]) for b in range(B)]
        for bsel, views in batch_selectors:
            for view in views.unique().tolist():
                yield bsel, (views == view).nonzero().flatten(), view

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

    def _chunk(self, q, k, tgt_idx, tgt_w, pair_w, scale: float, factor: float):
        """Loss contribution of one chunk of queries from one view; also (correct, scored) counts.

        q [B, H, c, d]; k prepared keys of the Vk supported views; tgt_idx / tgt_w [B, c, Vk, k];
        pair_w [B, c, Vk]. `factor` is 1 / (number of terms in this query group).
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
        target = torch.zeros(pair_w.shape + (hw,), device=q.device)  # [B, c, Vk, hw]
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
        loss = (term * pair_w[:, None]).sum() * (factor / num_out)
        with torch.no_grad():
            has_target = (target.sum(-1) > 0) & (pair_w[:, None] > 0)  # [B, 1, c, Vk]
            hit = (logits.argmax(-1) == target.argmax(-1)) & has_target
            correct = hit.sum().float() / num_out
            scored = has_target.sum().float()
        return loss, correct, scored
