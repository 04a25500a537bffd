"""Configuration: the experiment spec dataclasses (`spec`), the gin root (`gin_root`, the only gin
importer) and sweep files (`sweep_file`). `config.parse(...)` etc. resolve lazily, so the engine can
import `config.spec` without loading gin.
"""
from __future__ import annotations

from cameo_bench.lazy import exports

# submodule -> the names it provides; each submodule is imported on first use of one of its names
_EXPORTS = {
    'gin_root': ('parse', 'ConfigError', 'operative_config', 'config_str', 'run_experiment', 'SECTIONS'),
    'sweep_file': ('parse_sweep', 'SWEEP_PARAMS', 'SWEEP_REQUIRED'),
    'spec': ('Experiment', 'SpecError', 'is_baseline'),
}
__getattr__ = exports(__name__, _EXPORTS)
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
