"""Reads a sweep file (gin syntax, `sweep.*` bindings only) into plain literals, binding nothing.

The meaning of each parameter is documented in `cameo_bench.sweep.grid`. The file is read with gin's
own parser (`gin_root.statements`) but nothing is registered or bound: the values come back as plain
literals, gin's global state is untouched, and passing a sweep file to `cameo-bench train` fails
loudly ("No configurable matching 'sweep'").
"""
from __future__ import annotations

import difflib
import pathlib

from cameo_bench.config.gin_root import ConfigError, statements

SWEEP_PARAMS = ("name", "base", "axes", "fixed", "experiment", "output_dir", "executor", "workers",
                "slurm", "local_gpus", "reuse_from")
SWEEP_REQUIRED = ("name", "base", "axes")


def _check_literal(value, where: str) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_literal(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_literal(key, where)
            _check_literal(item, where)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}: sweep values must be plain literals (numbers, strings, lists, dicts); "
                          f"references and macros are not supported, got {value!r}")


def parse_sweep(path: str | pathlib.Path, bindings: list[str] | None = None) -> dict:
    """Read a sweep file (plus `sweep.*` override bindings) into `{param: literal}`.

    Anything but a `sweep.<param> = <literal>` statement is an error naming file and line, so an
    experiment binding put there by mistake is never silently ignored.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file not found: {path}")
    values: dict = {}
    texts = [(f"sweep file {path}", path.read_text())]
    texts += [(f"--gin_param {binding!r}", binding) for binding in bindings or []]
    for where, text in texts:
        for st in statements(text, where):
            at = f"{where}, line {st.line}"
            if not (st.kind == "binding" and not st.scoped and st.selector == "sweep"):
                raise ConfigError(f"{at}: a sweep file holds only `sweep.<param> = <value>` bindings, got {st.text!r}. "
                                  f"Experiment bindings go into sweep.fixed or the base gin files.")
            if st.param not in SWEEP_PARAMS:
                close = difflib.get_close_matches(st.param, SWEEP_PARAMS, n=2)
                raise ConfigError(f"{at}: unknown sweep parameter {st.param!r}; valid: {list(SWEEP_PARAMS)}"
                                  + (f". Did you mean {close}?" if close else ""))
            _check_literal(st.value, at)
            values[st.param] = st.value
    missing = [name for name in SWEEP_REQUIRED if name not in values]
    if missing:
        raise ConfigError(f"sweep file {path} does not set {['sweep.' + m for m in missing]}")
    return values
