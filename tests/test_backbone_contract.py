"""The attention-exposure contract, checked for every registered backbone at its `micro` preset.

A new backbone file is covered here automatically. References are independent of the backbone's
own attention code: attention is recomputed naively from the layer's projections
(`model.attention_module(name)`) applied to the tokens captured at that module's input.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from einops import rearrange

import backbones.registry
from backbones import (
    BackboneOutput,
    TapRequest,
    UnknownLayerError,
    UnknownNameError,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from backbones.interface import MultiViewBackbone

BACKBONES = list_backbones()
SIZE = 8  # divisible by every micro preset's patch size / total downsampling
B, V = 2, 3


# ---- helpers ---------------------------------------------------------------------------------------
def micro(name: str, **overrides):
    torch.manual_seed(0)
    return wake(create_backbone(name, "micro", **overrides))


def wake(model):
    """Give every zero-initialised tensor (adaLN-Zero, final layers, zero convs) random values.

    Zero outputs would make "identical output", "views mix" and round-trip checks pass trivially.
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:  # [n, 3, 3], det +1
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    return q


def inputs(model, num_views: int = V, batch: int = B, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    C = model.config.in_channels
    c2w = torch.eye(4).repeat(batch, num_views, 1, 1)
    c2w[..., :3, :3] = random_rotations(batch * num_views, gen).view(batch, num_views, 3, 3)
    c2w[..., :3, 3] = torch.randn(batch, num_views, 3, generator=gen)
    K = torch.tensor([[SIZE, 0.0, (SIZE - 1) / 2], [0.0, SIZE, (SIZE - 1) / 2], [0.0, 0.0, 1.0]])
    cond_mask = torch.ones(batch, num_views)
    cond_mask[:, 0] = 0  # view 0 is the reference
    return dict(
        x_t=torch.randn(batch, num_views, C, SIZE, SIZE, generator=gen),
        t=torch.randint(0, 1000, (batch,), generator=gen),
        cam2world=c2w,
        intrinsics=K.expand(batch, num_views, 3, 3).clone(),
        cond_mask=cond_mask,
    )


def run(model, batch: dict, **kwargs) -> BackboneOutput:
    x_t, t = batch["x_t"], batch["t"]
    rest = {k: v for k, v in batch.items() if k not in ("x_t", "t")}
    return model(x_t, t, **rest, **kwargs)


def capture_tokens(module, store: list):
    """Forward-pre hook saving the tokens the layer's projections read."""

    def hook(mod, args, kwargs):
        store.append(args[0] if args else kwargs["hidden_states"])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def as_scene_tokens(tokens: torch.Tensor, batch: int) -> torch.Tensor:  # -> [B, V*h*w, C]
    if tokens.shape[0] == batch:
        return tokens
    return rearrange(tokens, "(b v) n c -> b (v n) c", b=batch)


def naive_qkv(module, tokens: torch.Tensor, num_heads: int):  # tokens [B, N, C] -> 3 x [B, H, N, d]
    q, k, v = (
        rearrange(proj(tokens), "b n (h d) -> b h n d", h=num_heads)
        for proj in (module.to_q, module.to_k, module.to_v)
    )
    if module.norm_q is not None:
        q = module.norm_q(q)
    if module.norm_k is not None:
        k = module.norm_k(k)
    return q, k, v


def own_view_mask(query_idx: torch.Tensor, num_views: int, tokens_per_view: int) -> torch.Tensor:
    """[B, 1, Qs, N] True where the key is in the query's own view."""
    key_view = torch.arange(num_views * tokens_per_view) // tokens_per_view  # [N]
    return (key_view[None, None, None, :] == (query_idx // tokens_per_view)[:, None, :, None])


def tap_loss(tap) -> torch.Tensor:
    logits = tap.logits()  # [B, H, Qs, N]
    return (torch.logsumexp(logits, -1) - logits[..., 0]).mean()  # CE towards key 0


def nonzero_grad(param) -> bool:
    return param.grad is not None and bool(param.grad.abs().sum() > 0)


# ---- the contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_tap_never_changes_the_output(name):
    model = micro(name).eval()
    batch = inputs(model)
    with torch.no_grad():
        plain = run(model, batch).sample
        assert plain.abs().sum() > 0
        for layer in model.attention_layers():
            tapped = run(model, batch, tap=TapRequest(layer.name, want_features=True))
            assert tapped.tap is not None and tapped.tap.layer == layer.name
            assert torch.equal(tapped.sample, plain), layer.name
        assert run(model, batch).tap is None


def both_kinds_of_layers(name: str) -> list:
    """The micro model, plus its all-per-view variant when micro has no per-view layer."""
    model = micro(name).eval()
    if all(layer.cross_view for layer in model.attention_layers()):
        overrides = get_backbone_spec(name).cls.per_view_config
        assert overrides is not None, f"{name} must declare per_view_config (see MultiViewBackbone)"
        return [model, micro(name, **overrides).eval()]
    return [model]


@pytest.mark.parametrize("name", BACKBONES)
def test_tap_equals_naive_attention_from_the_layer_projections(name):
    models = both_kinds_of_layers(name)
    assert any(layer.cross_view for layer in models[0].attention_layers()), "micro needs a cross-view layer"
    for model in models:
        check_tap_against_naive_attention(model)


def check_tap_against_naive_attention(model):
    batch = inputs(model)
    gen = torch.Generator().manual_seed(2)
    for layer in model.attention_layers():
        module = model.attention_module(layer.name)
        h, w = SIZE // layer.stride, SIZE // layer.stride
        N = V * h * w
        query_idx = torch.randint(0, N, (B, 5), generator=gen)
        store: list = []
        handle = capture_tokens(module, store)
        with torch.no_grad():
            tap = run(model, batch, tap=TapRequest(layer.name, query_idx, want_features=True)).tap
        handle.remove()
        assert len(store) == 1, f"{layer.name}: attention module called {len(store)} times"

        assert tap.grid == (V, h, w) and tap.cross_view == layer.cross_view
        assert tap.q.shape == (B, layer.num_heads, 5, layer.head_dim)
        assert tap.k.shape == (B, layer.num_heads, N, layer.head_dim)
        assert torch.equal(tap.query_idx, query_idx)
        assert tap.scale == pytest.approx(layer.head_dim**-0.5)

        with torch.no_grad():
            q, k, v = naive_qkv(module, as_scene_tokens(store[0], B), layer.num_heads)  # [B, H, N, d]
            q_sel = q[torch.arange(B)[:, None], :, query_idx].transpose(1, 2)  # [B, H, Qs, d]
            logits = q_sel @ k.transpose(-1, -2) / layer.head_dim**0.5  # [B, H, Qs, N]
            tap_logits = tap.logits()
            if not layer.cross_view:  # the forward only let each query see its own view
                allowed = own_view_mask(query_idx, V, h * w)
                logits = logits.masked_fill(~allowed, float("-inf"))
                tap_logits = tap_logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(-1)
            torch.testing.assert_close(tap_logits.softmax(-1), probs, atol=1e-5, rtol=1e-4)
            # ...and those probabilities are what produced the layer's output rows.
            expected = rearrange(probs @ v, "b h q d -> b q (h d)")
            got = tap.features[torch.arange(B)[:, None], query_idx]  # [B, Qs, C]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_cross_view_layers_mix_views_and_per_view_layers_do_not(name):
    """Perturb view 1's tokens at one layer's input and watch the other views' outputs of that layer."""
    for model in both_kinds_of_layers(name):
        check_view_mixing_per_layer(model)


def check_view_mixing_per_layer(model):
    batch = inputs(model)
    for layer in model.attention_layers():
        module = model.attention_module(layer.name)
        outputs: list = []

        def perturb_view_1(mod, args, kwargs):
            tokens = args[0] if args else kwargs["hidden_states"]
            scene = as_scene_tokens(tokens, B).clone()
            n = scene.shape[1] // V
            scene[:, n : 2 * n] += torch.randn_like(scene[:, n : 2 * n])
            new = scene if tokens.shape[0] == B else rearrange(scene, "b (v n) c -> (b v) n c", v=V)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        keep = module.register_forward_hook(lambda mod, args, out: outputs.append(as_scene_tokens(out, B)))
        with torch.no_grad():
            run(model, batch)
            handle = module.register_forward_pre_hook(perturb_view_1, with_kwargs=True)
            run(model, batch)
        handle.remove()
        keep.remove()
        clean, dirty = (rearrange(o, "b (v n) c -> b v n c", v=V) for o in outputs)
        assert not torch.equal(clean[:, 1], dirty[:, 1])
        others_changed = (clean[:, [0, 2]] - dirty[:, [0, 2]]).abs().max()
        if layer.cross_view:
            assert others_changed > 1e-6, f"{layer.name} is cross-view but did not mix views"
        else:
            assert others_changed == 0, f"{layer.name} is per-view but leaked across views"


@pytest.mark.parametrize("name", BACKBONES)
def test_views_stay_apart_when_every_layer_is_per_view(name):
    overrides = get_backbone_spec(name).cls.per_view_config
    assert overrides is not None, f"{name} must declare per_view_config (see MultiViewBackbone)"
    model = micro(name, **overrides).eval()
    assert not any(layer.cross_view for layer in model.attention_layers())
    batch = inputs(model)
    dirty = dict(batch, x_t=batch["x_t"].clone())
    dirty["x_t"][:, 1] += 1.0
    with torch.no_grad():
        a, b = run(model, batch).sample, run(model, dirty).sample
    assert not torch.allclose(a[:, 1], b[:, 1])
    torch.testing.assert_close(a[:, [0, 2]], b[:, [0, 2]], atol=1e-6, rtol=0)

    mixing = micro(name).eval()  # the default micro has cross-view layers: others must change
    with torch.no_grad():
        a, b = run(mixing, batch).sample, run(mixing, dirty).sample
    assert (a[:, [0, 2]] - b[:, [0, 2]]).abs().max() > 1e-5


@pytest.mark.parametrize("name", BACKBONES)
def test_tap_gradient_reaches_q_k_and_input_embedding_but_not_v(name):
    model = micro(name)
    batch = inputs(model)
    for layer in model.attention_layers():
        model.zero_grad(set_to_none=True)
        tap = run(model, batch, tap=TapRequest(layer.name)).tap
        tap_loss(tap).backward()
        module = model.attention_module(layer.name)
        assert nonzero_grad(module.to_q.weight) and nonzero_grad(module.to_k.weight), layer.name
        assert not nonzero_grad(module.to_v.weight), f"{layer.name}: the tap must not train to_v"
        assert any(nonzero_grad(p) for p in model.input_embedding().parameters()), layer.name
        for later in model.attention_layers()[layer.index + 1 :]:  # downstream layers cannot matter
            assert not nonzero_grad(model.attention_module(later.name).to_q.weight), later.name


@pytest.mark.parametrize("name", BACKBONES)
def test_tap_keeps_its_graph_under_gradient_checkpointing(name):
    layer = micro(name).attention_layers()[-1].name
    grads, samples = [], []
    for checkpointing in (False, True):
        model = micro(name).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        out = run(model, inputs(model), tap=TapRequest(layer))
        assert out.tap.q.requires_grad and out.tap.k.requires_grad
        tap_loss(out.tap).backward()
        grads.append(next(model.input_embedding().parameters()).grad.clone())
        samples.append(out.sample.detach())
    torch.testing.assert_close(samples[1], samples[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_forward_backward_shapes(name, num_views):
    model = micro(name)
    batch = inputs(model, num_views=num_views)
    batch["x_t"].requires_grad_(True)
    layer = model.attention_layers()[0]
    out = run(model, batch, tap=TapRequest(layer.name))
    assert out.sample.shape == batch["x_t"].shape
    h = SIZE // layer.stride
    assert out.tap.k.shape[2] == num_views * h * h
    (out.sample.square().mean() + tap_loss(out.tap)).backward()
    assert batch["x_t"].grad.shape == batch["x_t"].shape
    assert torch.isfinite(batch["x_t"].grad).all() and batch["x_t"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_save_and_load_round_trip(name, tmp_path):
    model = micro(name).eval()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.attention_layers() == model.attention_layers()
    batch = inputs(model)
    with torch.no_grad():
        assert torch.equal(run(loaded, batch).sample, run(model, batch).sample)


@pytest.mark.parametrize("name", BACKBONES)
def test_unknown_layer_fails_listing_valid_names(name):
    model = micro(name)
    valid = model.layer_names()
    batch = inputs(model)
    for kwargs in ({"tap": TapRequest("no.such.layer")}, {"perturb": {"no.such.layer": "identity"}}):
        with pytest.raises(UnknownLayerError) as err:
            run(model, batch, **kwargs)
        assert all(layer in str(err.value) for layer in valid)
    typo = valid[0][:-1] + "X"
    with pytest.raises(UnknownLayerError, match="Did you mean"):
        run(model, batch, tap=TapRequest(typo))
    with pytest.raises(UnknownLayerError):
        model.attention_module("no.such.layer")
    with pytest.raises(ValueError, match="unknown perturbation"):
        run(model, batch, perturb={valid[0]: "zero"})


@pytest.mark.parametrize("name", BACKBONES)
def test_perturb_identity_outputs_the_values(name):
    model = micro(name).eval()
    batch = inputs(model)
    with torch.no_grad():
        plain = run(model, batch).sample
        for layer in model.attention_layers():
            store: list = []
            handle = capture_tokens(model.attention_module(layer.name), store)
            tap = TapRequest(layer.name, want_features=True)
            out = run(model, batch, tap=tap, perturb={layer.name: "identity"})
            handle.remove()
            assert not torch.equal(out.sample, plain), layer.name
            _, _, v = naive_qkv(model.attention_module(layer.name), as_scene_tokens(store[0], B), layer.num_heads)
            torch.testing.assert_close(out.tap.features, rearrange(v, "b h n d -> b n (h d)"))


@pytest.mark.parametrize("name", BACKBONES)
def test_attention_layers_are_listed_in_execution_order(name):
    model = micro(name).eval()
    layers = model.attention_layers()
    names = [layer.name for layer in layers]
    assert len(set(names)) == len(names)
    assert [layer.index for layer in layers] == list(range(len(layers)))
    seen: list[str] = []
    handles = [
        model.attention_module(n).register_forward_pre_hook(lambda mod, args, n=n: seen.append(n)) for n in names
    ]
    with torch.no_grad():
        run(model, inputs(model))
    for handle in handles:
        handle.remove()
    assert seen == names
    assert all(re.search(r"\d{2}", n) for n in names), "indices in names must be zero-padded"


@pytest.mark.parametrize("name", BACKBONES)
def test_every_layer_has_a_stage_and_stages_are_contiguous(name):
    layers = micro(name).attention_layers()
    stages = [layer.stage for layer in layers]
    assert all(isinstance(stage, str) and stage for stage in stages)
    runs = [stage for i, stage in enumerate(stages) if i == 0 or stages[i - 1] != stage]
    assert len(runs) == len(set(runs)), f"a stage comes back after another one: {stages}"
    assert micro(name).stages() == runs


def naive_select(layers, selector: str, input_stride: int = 1) -> str:
    """The selector grammar written out as plain loops over the forward order (test reference)."""
    stage, rule = selector.split(":", 1) if selector.split(":", 1)[0] in {l.stage for l in layers} else (None, selector)
    pool = [l for l in layers if stage is None or l.stage == stage]
    if rule == "first":
        return pool[0].name
    if rule == "last":
        return pool[len(pool) - 1].name
    if rule == "first_cross_view":
        return next(l.name for l in pool if l.cross_view)
    if rule == "last_cross_view":
        return next(l.name for l in reversed(pool) if l.cross_view)
    if rule.startswith("1/"):
        return next(l.name for l in pool if l.stride * input_stride == int(rule[2:]))
    raise AssertionError(selector)


@pytest.mark.parametrize("name", BACKBONES)
def test_selectors_resolve_like_the_grammar_says(name):
    model = micro(name)
    layers = model.attention_layers()
    for layer in layers:
        assert model.resolve_layer(layer.name) == layer.name
    strides = sorted({layer.stride for layer in layers})
    for prefix in ["", *(f"{stage}:" for stage in model.stages())]:
        pool = [l for l in layers if not prefix or l.stage == prefix[:-1]]
        rules = ["first", "last"] + (["first_cross_view", "last_cross_view"] if any(l.cross_view for l in pool) else [])
        rules += [f"1/{s}" for s in sorted({l.stride for l in pool})]
        for rule in rules:
            assert model.resolve_layer(prefix + rule) == naive_select(layers, prefix + rule), prefix + rule
    for s in strides:  # on latents 8x smaller than the image, every grid is 8x coarser
        assert model.resolve_layer(f"1/{8 * s}", input_stride=8) == naive_select(layers, f"1/{s}")
    assert model.resolve_layer("depth:0") == layers[0].name and model.resolve_layer("depth:1") == layers[-1].name


@pytest.mark.parametrize("name", BACKBONES)
def test_unknown_selectors_list_the_layers_and_the_grammar(name):
    model = micro(name)
    valid = model.layer_names()
    bad_selectors = ("no_such_stage:first", "first_cross_vew", "1/3", "depth:1.5", "depth:half",
                     f"{model.stages()[0]}:middle")
    for bad in bad_selectors:
        with pytest.raises(UnknownLayerError) as err:
            model.resolve_layer(bad)
        message = str(err.value)
        assert all(layer in message for layer in valid), bad
        assert all(word in message for word in ("[STAGE:]RULE", "first_cross_view", "depth:F", "1/N", *model.stages()))
        assert isinstance(err.value, ValueError)  # a bad config value, like an unknown registry name
    with pytest.raises(UnknownLayerError, match=r"Did you mean \['first_cross_view'"):
        model.resolve_layer("first_cross_vew")
    with pytest.raises(ValueError, match="input_stride"):
        model.resolve_layer("1/2", input_stride=0)
    with pytest.raises(UnknownLayerError) as err:
        model.resolve_layer("1/3")
    back = pickle.loads(pickle.dumps(err.value))  # sweep workers send errors through a process pool
    assert type(back) is UnknownLayerError and str(back) == str(err.value)


# ---- the registry ------------------------------------------------------------------------------------
class _Dummy(MultiViewBackbone, torch.nn.Module):
    def __init__(self, width: int = 1):
        super().__init__()


def test_every_backbone_has_micro_and_its_default_preset():
    assert {"mv_dit", "mv_unet"} <= set(BACKBONES)
    for name in BACKBONES:
        spec = get_backbone_spec(name)
        assert "micro" in spec.presets and spec.default_preset in spec.presets


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_is_the_contracts_template_and_init_fields_are_config_fields(name):
    """The shared `forward` (input checks, TapState, camera signal) must not be shadowed by
    nn.Module's placeholder: MultiViewBackbone comes first in the bases."""
    cls = get_backbone_spec(name).cls
    assert cls.forward is MultiViewBackbone.forward and cls.__mro__[1] is MultiViewBackbone
    assert "_denoise" in vars(cls) and "size_multiple" in vars(cls)
    assert set(cls.init_overridable) <= set(get_backbone_spec(name).config_fields())


def test_every_module_that_registers_is_imported():
    """Auto-import: a backbone file registers itself without being listed anywhere."""
    folder = Path(backbones.__file__).parent
    registering = {  # a call or a decorator at the start of a line, not the definition in registry.py
        f"backbones.{path.stem}" for path in folder.glob("*.py")
        if re.search(r"^\s*@?register_backbone\(", path.read_text(), re.MULTILINE)
    }
    assert {"backbones.mv_dit", "backbones.mv_unet"} <= registering
    assert registering <= {get_backbone_spec(n).module for n in BACKBONES}


@pytest.fixture
def scratch_registry(monkeypatch):
    """Throwaway registrations go into a copy of the backbone registry."""
    monkeypatch.setattr(backbones.registry, "BACKBONES", backbones.registry.BACKBONES.copy())


def test_duplicate_names_raise(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("mv_dit", presets={"tiny": {}})(_Dummy)
    register_backbone("dummy", presets={"tiny": {"width": 2}})(_Dummy)
    assert "dummy" in list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("dummy", presets={"tiny": {}})(_Dummy)


def test_bad_registrations_fail_at_import(scratch_registry):
    with pytest.raises(TypeError, match="'widht'.*width"):
        register_backbone("dummy", presets={"tiny": {"widht": 2}})(_Dummy)
    with pytest.raises(ValueError, match="default preset"):
        register_backbone("dummy", presets={"micro": {}})
    with pytest.raises(TypeError, match="MultiViewBackbone"):
        register_backbone("dummy", presets={"tiny": {}})(torch.nn.Linear)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'mv_dti' \(did you mean 'mv_dit'") as err:
        create_backbone("mv_dti")
    assert all(name in str(err.value) for name in BACKBONES)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownNameError, match=r"unknown mv_dit preset 'mikro' \(did you mean 'micro'\?\)") as err:
        create_backbone("mv_dit", "mikro")
    assert "micro" in str(err.value) and "XL/2" in str(err.value)
    with pytest.raises(TypeError, match="'depht'.*depth"):
        create_backbone("mv_dit", "micro", depht=3)


def test_overrides_win_over_the_preset():
    model = create_backbone("mv_dit", "micro", depth=3, cross_view=[True, False, True])
    assert [layer.cross_view for layer in model.attention_layers()] == [True, False, True]
    assert model.config.hidden_size == 32  # the rest still comes from the preset
    assert create_backbone("mv_dit").config.hidden_size == 128  # default preset: tiny
