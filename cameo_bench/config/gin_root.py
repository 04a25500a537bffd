"""The only module that talks to gin.

Gin binds the fields of the plain dataclasses in `cameo_bench.config.spec` under short scope names
(`backbone.name`, `cameo.weight`, `train.steps`, ...) and one root, `run_experiment`. The engine
receives an `Experiment` of plain values and never imports gin, so it can be driven from Python,
a sweep, or a test without a config file.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re

import gin

from cameo_bench.config import spec
SECTIONS = {
    "backbone": spec.BackboneSpec,
    "data": spec.DataSpec,
    "diffusion": spec.DiffusionSpec,
    "cameo": spec.CameoSpec,
    "optim": spec.OptimSpec,
    "train": spec.TrainSpec,
    "eval": spec.EvalSpec,
    "tracking": spec.TrackingSpec,
}

_CONFIGURABLES = {
    name: gin.external_configurable(cls, name=name, module="cameo_bench") for name, cls in SECTIONS.items()
}


@gin.configurable(module="cameo_bench")
def run_experiment(name: str = "experiment", output_dir: str = "runs", seed: int = 0) -> spec.Experiment:
    """The gin root: collects every section into one `Experiment` of plain values."""
    sections = {key: make() for key, make in _CONFIGURABLES.items()}
    return spec.Experiment(name=name, output_dir=output_dir, seed=seed, **sections)


class ConfigError(ValueError):
    """A gin file or binding that cannot be applied; the message names the file and the binding."""


def _known_bindings() -> list[str]:
    names = [f"run_experiment.{f}" for f in ("name", "output_dir", "seed")]
    for section, cls in SECTIONS.items():
        names += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return names


def _explain(err: Exception, where: str) -> ConfigError:
    message = str(err)
    hint = ""
    match = re.search(r"No configurable matching '([^']+)'", message)
    if match:
        close = difflib.get_close_matches(match.group(1), list(SECTIONS) + ["run_experiment"], n=3)
        hint = f"\nKnown scopes: {sorted(SECTIONS) + ['run_experiment']}." + (
            f" Did you mean {close}?" if close else ""
        )
    match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if match:
        scope, param = match.groups()
        valid = [b.split(".", 1)[1] for b in _known_bindings() if b.startswith(scope + ".")]
        close = difflib.get_close_matches(param, valid, n=3)
        hint = f"\nValid parameters of {scope!r}: {valid}." + (f" Did you mean {close}?" if close else "")
    return ConfigError(f"{where}: {message}{hint}")


def parse(gin_files: list[str | pathlib.Path], bindings: list[str] | None = None) -> spec.Experiment:
    """Parse gin files and bindings (later ones win) into an `Experiment`.

    Files are parsed one at a time so that an error always names the file it came from.
    """
    gin.clear_config()
    search_root = pathlib.Path(__file__).resolve().parents[2]
    gin.add_config_file_search_path(str(search_root))
    for path in gin_files:
        path = pathlib.Path(path)
        if not path.exists() and (search_root / path).exists():
            path = search_root / path
        if not path.exists():
            raise ConfigError(f"gin file not found: {path}")
        try:
            gin.parse_config_file(str(path))
        except (ValueError, SyntaxError, TypeError, KeyError) as err:
            raise _explain(err, f"in gin file {path}") from None
    for binding in bindings or []:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError) as err:
            raise _explain(err, f"in --gin_param {binding!r}") from None
    try:
        return run_experiment()
    except (ValueError, TypeError) as err:
        raise _explain(err, "while building the experiment") from None


def operative_config() -> str:
    """Gin's record of the bindings that were actually used (write it next to the results)."""
    return gin.operative_config_str()


def config_str() -> str:
    return gin.config_str()


# --- sweep files (sweep.*) ---
# A sweep file is gin syntax holding bindings of one name only, `sweep` (the meaning of each
# parameter is documented in cameo_bench.sweep). It is read with gin's own parser but nothing is
# registered or bound: the values come back as plain literals, gin's global state is untouched, and
# passing a sweep file to `cameo-bench train` fails loudly ("No configurable matching 'sweep'").

SWEEP_PARAMS = ("name", "base", "axes", "fixed", "experiment", "output_dir", "executor", "workers",
                "slurm", "local_gpus")
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
    from gin import config_parser

    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file not found: {path}")
    values: dict = {}
    texts = [(f"sweep file {path}", path.read_text())]
    texts += [(f"--gin_param {binding!r}", binding) for binding in bindings or []]
    for where, text in texts:
        try:
            statements = list(config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)))
        except (SyntaxError, ValueError) as err:
            raise ConfigError(f"in {where}: {err}") from None
        for statement in statements:
            location = getattr(statement, "location", None)
            at = f"{where}, line {getattr(location, 'line_num', '?')}"
            is_sweep = (isinstance(statement, config_parser.BindingStatement) and not statement.scope
                        and statement.selector == "sweep")
            if not is_sweep:
                line = (getattr(location, "line_content", "") or "").strip()
                raise ConfigError(f"{at}: a sweep file holds only `sweep.<param> = <value>` bindings, got {line!r}. "
                                  f"Experiment bindings go into sweep.fixed or the base gin files.")
            if statement.arg_name not in SWEEP_PARAMS:
                close = difflib.get_close_matches(statement.arg_name, SWEEP_PARAMS, n=2)
                raise ConfigError(f"{at}: unknown sweep parameter {statement.arg_name!r}; valid: {list(SWEEP_PARAMS)}"
                                  + (f". Did you mean {close}?" if close else ""))
            _check_literal(statement.value, at)
            values[statement.arg_name] = statement.value
    missing = [name for name in SWEEP_REQUIRED if name not in values]
    if missing:
        raise ConfigError(f"sweep file {path} does not set {['sweep.' + m for m in missing]}")
    return values
