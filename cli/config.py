"""Command-line configs for every entry point (one dialect) and the user errors they report in one line.

Each entry point owns a dataclass whose fields carry their help text. Values are resolved as
dataclass defaults < YAML file (first positional argument) < `key=value` overrides, where nested
sections use dotted keys (`model.lora_r=32`) and `--flag` / `--some-key=v` are spellings of
`flag=true` / `some_key=v`. Unknown keys and wrongly typed values are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """Bad input from the user (config, data, run folder): the CLI reports it in one line."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the entry point's dataclass."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with help text; list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def split_argv(argv: list[str]) -> tuple[Path | None, list[str], list[str]]:
    """Split argv into (yaml path, `key=value` overrides, other positional words)."""
    yaml_path, overrides, words = None, [], []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            overrides.append(f"{key.replace('-', '_')}={value if eq else 'true'}")
        elif "=" in arg:
            overrides.append(arg)
        elif arg.endswith((".yaml", ".yml")) and yaml_path is None:
            yaml_path = Path(arg)
        else:
            words.append(arg)
    return yaml_path, overrides, words


def load_config(cls: type, argv: list[str]) -> Any:
    """Build `cls` from argv (`[config.yaml] key=value ...`); rejects stray positional words."""
    return parse_args(cls, argv)[0]


def parse_args(cls: type, argv: list[str]) -> tuple[Any, dict]:
    """(config, the keys the YAML and the command line set, as a nested mapping of their raw values).

    The mapping tells "set to the default" from "not set": `infer predict` applies only the
    `infer.*` keys that were given on top of each run's saved settings.
    """
    yaml_path, overrides, words = split_argv(argv)
    if words:
        raise ConfigError(f"unexpected argument(s) {words}: use key=value (see --help)")
    raw = read_raw(yaml_path, overrides)
    return _build(cls, raw, prefix="", source=_source(yaml_path, overrides)), raw


def build_config(cls: type, yaml_path: Path | None = None, overrides: list[str] | None = None) -> Any:
    return _build(cls, read_raw(yaml_path, overrides), prefix="", source=_source(yaml_path, overrides))


def _source(yaml_path: Path | None, overrides: list[str] | None) -> str:
    return " + ".join(filter(None, [str(yaml_path or ""), "command-line overrides" if overrides else ""])) or "defaults"


def read_raw(yaml_path: Path | None, overrides: list[str] | None) -> dict:
    raw: dict = {}
    if yaml_path is not None:
        if not yaml_path.is_file():
            raise ConfigError(f"config file not found: {yaml_path}")
        try:
            raw = yaml.safe_load(yaml_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{yaml_path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping")
    for item in overrides or []:
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # absent, or a YAML section whose keys are all commented out
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = value  # kept as text; converted against the field's type below
    return raw


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]} in {source}; known keys: {sorted(prefix + n for n in names)}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _convert(hints[name], value, prefix + name, source)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own validation (__post_init__)
        raise ConfigError(f"{source}: {err}") from None


def _parse_text(value: str, key: str, source: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"{key} in {source}: cannot parse {value!r}") from None


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} in {source} must be a section (mapping), got {value!r}")
        return _build(tp, value, prefix=key + ".", source=source)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _convert(args[0], value, key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            if value.startswith("["):
                value = _parse_text(value, key, source)
            else:
                value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} in {source} must be a list, got {value!r}")
        return [_convert(item_tp, v, key, source) for v in value]
    if isinstance(value, str) and tp is float:
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    elif isinstance(value, str) and tp is not str:
        value = _parse_text(value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key} in {source} must be {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def format_help(cls: type, prefix: str = "") -> str:
    """One line per field, nested sections flattened to dotted keys."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(format_help(hints[f.name], prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix + f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def run_cli(main) -> None:
    """Run an entry point's main(); expected user errors print one clear line instead of a traceback."""
    try:
        main()
    except (UserError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def cli_config(cls: type, doc: str, argv: list[str] | None = None, given: bool = False) -> Any:
    """Parse argv for an entry point; prints `doc` and the field list on --help, exits 2 on errors.

    given=True returns (config, the keys that were set) as parse_args does.
    """
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(doc.strip() + "\n\nSettings (key=value; sections as section.key=value; --flag means flag=true):\n"
              + format_help(cls))
        raise SystemExit(0)
    try:
        cfg, raw = parse_args(cls, argv)
        return (cfg, raw) if given else cfg
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def from_dict(cls: type, raw: dict, source: str) -> Any:
    """Build `cls` from an already-parsed mapping (e.g. a run folder's saved config section)."""
    return _build(cls, raw, prefix="", source=source)
