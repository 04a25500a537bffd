"""The gin root: turns gin files and bindings into an `Experiment`; the only module that imports gin.

Gin binds the fields of the plain dataclasses in `cameo_bench.config.spec` under short scope names
(`backbone.name`, `cameo.weight`, `train.steps`, ...) and one root, `run_experiment`. The engine
receives an `Experiment` of plain values and never imports gin, so it can be driven from Python,
a sweep, or a test without a config file. Every error, a gin one or a spec field outside its valid
values, comes back as a `ConfigError` naming the file or command-line binding it came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
from typing import Any

import gin
from gin import config_parser

from cameo_bench.config import spec

SECTIONS = {cls.SECTION: cls for cls in spec.SECTIONS}
REPO = pathlib.Path(__file__).resolve().parents[2]  # where `include 'gin/...'` paths are found

_CONFIGURABLES = {
    name: gin.external_configurable(cls, name=name, module="cameo_bench") for name, cls in SECTIONS.items()
}


@gin.configurable(module="cameo_bench")
def run_experiment(name: str = "experiment", output_dir: str = "runs", seed: int = 0,
                   shrink: bool = False) -> spec.Experiment:
    """The gin root: collects every section into one `Experiment` of plain values. `shrink = True`
    turns it into its micro version (`config.shrink.shrunk`: what CI runs of a paper recipe)."""
    sections = {key: make() for key, make in _CONFIGURABLES.items()}
    exp = spec.Experiment(name=name, output_dir=output_dir, seed=seed, **sections)
    if shrink is not False:
        from cameo_bench.config.shrink import shrunk

        if not isinstance(shrink, bool):
            raise spec.SpecError(f"run_experiment.shrink = {shrink!r} is not valid: use True or False",
                                 "run_experiment.shrink")
        exp = shrunk(exp)
    return exp


class ConfigError(ValueError):
    """A gin file or binding that cannot be applied; the message names the file and the binding."""


def _known_bindings() -> list[str]:
    names = [f"run_experiment.{f}" for f in ("name", "output_dir", "seed", "shrink")]
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


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement of gin text as plain values (gin's parser objects stay in this module)."""

    kind: str  # "binding", "include" or "import"
    selector: str | None  # `train` in `train.steps = 3`; None unless a binding
    param: str | None  # `steps`
    scoped: bool  # `scope/train.steps = 3`
    value: Any  # the bound literal, or the included file name
    line: int | str  # line number, "?" when gin does not know it
    text: str  # the line as written


def statements(text: str, where: str) -> list[Statement]:
    """Read gin text statement by statement without registering or binding anything (unknown
    configurables and macros are kept as gin's placeholder objects)."""
    try:
        parsed = list(config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True)))
    except (SyntaxError, ValueError) as err:
        raise ConfigError(f"in {where}: {err}") from None
    out = []
    for st in parsed:
        location = getattr(st, "location", None)
        line, content = getattr(location, "line_num", "?"), (getattr(location, "line_content", "") or "").strip()
        if isinstance(st, config_parser.BindingStatement):
            out.append(Statement("binding", st.selector, st.arg_name, bool(st.scope), st.value, line, content))
        elif isinstance(st, config_parser.IncludeStatement):
            out.append(Statement("include", None, None, False, st.filename, line, content))
        else:
            out.append(Statement("import", None, None, False, None, line, content))
    return out


def _find_file(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    return REPO / path if not path.exists() and (REPO / path).exists() else path


def _where_bound(binding: str, gin_files: list, bindings: list[str]) -> str | None:
    """Where the last value of `binding` (`train.steps`) was set: a command-line binding, else a
    line of a gin file (includes followed), in gin's order of precedence."""
    selector, _, param = binding.partition(".")

    def binds(st: Statement) -> bool:
        return st.kind == "binding" and not st.scoped and (st.selector, st.param) == (selector, param)

    for text in reversed(bindings):
        if any(binds(st) for st in statements(text, "--gin_param")):
            return f"in --gin_param {text!r}"

    def last_in(path: pathlib.Path, depth: int = 0) -> str | None:
        found = None
        if depth > 8 or not path.exists():
            return None
        for st in statements(path.read_text(), f"gin file {path}"):
            if st.kind == "include":
                found = last_in(_find_file(st.value), depth + 1) or found
            elif binds(st):
                found = f"in gin file {path}, line {st.line}"
        return found

    for path in reversed(gin_files):
        found = last_in(_find_file(path))
        if found:
            return found
    return None


def parse(gin_files: list[str | pathlib.Path], bindings: list[str] | None = None) -> spec.Experiment:
    """Parse gin files and bindings (later ones win) into an `Experiment`.

    Files are parsed one at a time so that an error always names the file it came from.
    """
    gin.clear_config()
    gin.add_config_file_search_path(str(REPO))
    bindings = list(bindings or [])
    for path in gin_files:
        path = _find_file(path)
        if not path.exists():
            raise ConfigError(f"gin file not found: {path}")
        try:
            gin.parse_config_file(str(path))
        except (ValueError, SyntaxError, TypeError, KeyError) as err:
            raise _explain(err, f"in gin file {path}") from None
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError) as err:
            raise _explain(err, f"in --gin_param {binding!r}") from None
    try:
        return run_experiment()
    except spec.SpecError as err:
        found = (_where_bound(b, list(gin_files), bindings) for b in err.bindings)
        where = next((w for w in found if w), "while building the experiment")
        raise ConfigError(f"{where}: {err.detail}") from None
    except (ValueError, TypeError) as err:
        raise _explain(err, "while building the experiment") from None


def operative_config() -> str:
    """Gin's record of the bindings that were actually used (write it next to the results)."""
    return gin.operative_config_str()


def config_str() -> str:
    return gin.config_str()
