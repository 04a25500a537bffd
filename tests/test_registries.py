"""Every registry fails the same way: the generic `Registry`, then backbones, sources and converters.

Also that reading a registry stays cheap: `import backbones.registry` loads no model code, and the
built-in backbones register themselves on the first lookup.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backbones.registry import Registry, UnknownNameError

REPO = Path(__file__).resolve().parents[1]


# ---- the generic helper ------------------------------------------------------------------------------
def test_register_get_list():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2
    reg.decorator("a")(1)
    assert reg.get("a") == 1 and reg.get("b") == 2
    assert reg.list() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2 and "a" in reg


def test_duplicates_raise_and_name_the_first_registration():
    reg: Registry[object] = Registry("widget")

    def make():
        pass

    reg.register("w", make)
    with pytest.raises(ValueError, match=r"widget 'w' is already registered by test_registries\..*\.make;"):
        reg.register("w", object())
    assert reg.get("w") is make  # the first registration stays
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("", 1)


def test_unknown_names_are_key_and_value_errors_listing_valid_names_and_close_matches():
    reg: Registry[int] = Registry("correspondence source")
    for i, name in enumerate(["depth", "noisy_depth", "matches", "epipolar"]):
        reg.register(name, i)
    with pytest.raises(UnknownNameError) as err:
        reg.get("dpeth")
    e = err.value
    assert isinstance(e, KeyError) and isinstance(e, ValueError)
    assert str(e) == (
        "unknown correspondence source 'dpeth' (did you mean 'depth'?); "
        "valid sources: ['depth', 'epipolar', 'matches', 'noisy_depth']"
    )  # readable: not the repr() KeyError would print
    assert (e.kind, e.name, e.close) == ("correspondence source", "dpeth", ["depth"])
    with pytest.raises(UnknownNameError, match=r"'zzz'; valid sources"):  # no close match: no hint
        reg.get("zzz")


def test_unknown_name_errors_survive_pickling():
    """Sweep workers send their errors back through a process pool."""
    err = UnknownNameError("converter", "colmp", ["colmap", "re10k"])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is UnknownNameError and str(back) == str(err) and back.close == ["colmap"]


def test_loader_runs_once_on_first_use_and_may_register_while_running():
    reg: Registry[int] = Registry("widget")
    calls = []

    def loader():
        calls.append(1)
        reg.register("builtin", 0)  # what a module imported by the loader does
        assert "builtin" in reg  # a lookup during loading does not recurse

    reg.set_loader(loader)
    assert calls == []  # nothing happens before the first use
    assert reg.list() == ["builtin"] and reg.get("builtin") == 0
    assert calls == [1]
    with pytest.raises(ValueError, match="already registered"):  # a user duplicate of a built-in name
        reg.register("builtin", 1)


def test_a_failing_loader_fails_again_instead_of_reporting_unknown_names():
    reg: Registry[int] = Registry("widget")
    reg.set_loader(lambda: 1 / 0)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            reg.get("anything")


# ---- the project's registries behave alike ---------------------------------------------------------------
def _backbones():
    from backbones import get_backbone_spec, list_backbones, register_backbone
    from backbones.interface import MultiViewBackbone

    class Dummy(MultiViewBackbone):
        pass

    register = lambda name: register_backbone(name, {"tiny": {}})(Dummy)  # noqa: E731
    return get_backbone_spec, list_backbones, register, "mv_dit", "mv_dti"


def _sources():
    from cameo_bench.correspondence import get_source, list_sources, register_source

    register = lambda name: register_source(name)(lambda batch, grid, stride: None)  # noqa: E731
    return get_source, list_sources, register, "depth", "dpeth"


def _converters():
    from cameo_bench.data.converters import get_converter, list_converters, register_converter

    register = lambda name: register_converter(name)(lambda src: iter(()))  # noqa: E731
    return get_converter, list_converters, register, "colmap", "colmp"


@pytest.mark.parametrize("registry", [_backbones, _sources, _converters], ids=["backbones", "sources", "converters"])
def test_project_registries_share_the_error_type_and_refuse_duplicates(registry):
    get, list_names, register, existing, typo = registry()
    valid = list_names()
    assert existing in valid and valid == sorted(valid)
    with pytest.raises(UnknownNameError) as err:
        get(typo)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert f"(did you mean {existing!r}" in str(err.value)
    assert all(repr(name) in str(err.value) for name in valid)
    with pytest.raises(ValueError, match=f"{existing!r} is already registered"):
        register(existing)
    assert list_names() == valid  # the failed registration changed nothing


def test_cameo_bench_registry_is_the_backbones_helper():
    import backbones.registry
    import cameo_bench.registry

    assert cameo_bench.registry.Registry is backbones.registry.Registry
    assert cameo_bench.registry.UnknownNameError is backbones.registry.UnknownNameError


# ---- importing a registry loads no model code ------------------------------------------------------------
def _loaded_after(code: str) -> list[str]:
    """Heavy modules present in sys.modules after running `code` in a fresh interpreter."""
    probe = textwrap.dedent(code) + textwrap.dedent("""
        import sys
        heavy = ("torch", "diffusers", "timm", "backbones.mv_unet", "backbones.mv_dit", "backbones.interface")
        print(",".join(m for m in heavy if m in sys.modules))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


def test_importing_the_registries_loads_no_torch_and_no_model():
    assert _loaded_after("import backbones.registry") == []
    assert _loaded_after("import cameo_bench.registry") == []
    assert _loaded_after("from backbones import Registry, UnknownNameError, create_backbone, list_backbones") == []


def test_interface_names_load_torch_but_no_model():
    assert _loaded_after("from backbones import TapRequest, MultiViewBackbone") == ["torch", "backbones.interface"]


def test_the_first_lookup_registers_every_builtin_backbone():
    from backbones import list_backbones

    assert {"mv_dit", "mv_unet"} <= set(list_backbones())
    assert {"backbones.mv_dit", "backbones.mv_unet"} <= set(sys.modules)
