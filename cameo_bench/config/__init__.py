"""Configuration: the experiment spec dataclasses (`spec`), the gin root (`gin_root`, the only gin
importer) and sweep files (`sweep_file`). `config.parse(...)` etc. resolve lazily, so the engine can
import `config.spec` without loading gin.
"""
from __future__ import annotations

import importlib

# name -> submodule: imported on first use, so importing one part does not load the others
_EXPORTS = {
    'parse': 'gin_root',
    'ConfigError': 'gin_root',
    'operative_config': 'gin_root',
    'config_str': 'gin_root',
    'run_experiment': 'gin_root',
    'SECTIONS': 'gin_root',
    'parse_sweep': 'sweep_file',
    'SWEEP_PARAMS': 'sweep_file',
    'SWEEP_REQUIRED': 'sweep_file',
    'Experiment': 'spec',
    'SpecError': 'spec',
    'is_baseline': 'spec',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
