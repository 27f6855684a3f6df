"""One config mechanism for recipes (`recipe.py`) and training configs (`train/config.py`).

Both are dataclasses whose fields carry their help (`option(default, help=...)`, as TRL's `DPOConfig`)
and check their own values in `__post_init__`. They are read the same way:

    read_yaml(path)          a bounded YAML loader (size, alias expansion, nesting)
    parse_overrides(items)   the one `--set KEY=VALUE` parser
    build(cls, data, file)   the one builder: a mapping -> a dataclass (unknown keys, declared types)
    options(cls)             every key with its type, default and help (`mmpr build|train --list-options`)

Every problem is a `ConfigError` whose message names the file, the key (a dotted path such as
`sources[1].sampling.n`) and the reason.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or training config that cannot be used; the message names file, key and reason."""

    def __init__(self, file: str | Path, key: str, reason: str):
        self.file, self.key, self.reason = str(file), key, reason
        super().__init__(f"{file}: {key}: {reason}")


def check(cond: bool, key: str, reason: str, file: str = "<config>") -> None:
    """Raise ConfigError(file, key, reason) unless `cond`; for `__post_init__` checks, whose key is
    relative to that dataclass (`build` adds the path and the file)."""
    if not cond:
        raise ConfigError(file, key, reason)


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    settable: bool = True,
    **kwargs,
) -> Any:
    """A dataclass field with its help text in `metadata["help"]` (shown by `--list-options`).

    `settable=False` marks a field that is not a key of the YAML file (e.g. `file`, set by the loader).
    """
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"help": help, "settable": settable},
        **kwargs,
    )


def settable_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("settable", True)}


# --- reading YAML -------------------------------------------------------------------------------------

# Bounds for reading YAML (recipes, training configs): both are a few KB. Aliases are bounded by the
# number of values they expand to, so a 1 KB "billion laughs" document fails at once instead of
# growing without end in whatever walks it next.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


class _YAMLTooBig(ValueError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a document whose aliases expand to over MAX_YAML_VALUES values."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is copied out (memoised per shared node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _YAMLTooBig("an alias refers to a value that contains it (a recursive alias)")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise _YAMLTooBig(f"its aliases expand to over {MAX_YAML_VALUES:,} values (a YAML alias bomb?)")
    sizes[id(node)] = size
    return size


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (None if empty), read within MAX_YAML_BYTES and MAX_YAML_VALUES.

    Every problem is a ConfigError naming the file: missing, a folder or other non-file, too big,
    not UTF-8, not YAML (with the line), nested too deeply, or an alias bomb.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "(file)", "no such file")
    if path.is_dir():
        raise ConfigError(path, "(file)", "is a folder; give the YAML file in it")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ConfigError(path, "(file)", "is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, "(file)", f"cannot be read: {e.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(
            path, "(file)", f"is larger than {MAX_YAML_BYTES >> 20} MiB; a YAML config is a few KB"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            path, "(file)", f"is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})"
        ) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise ConfigError(path, where, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    except _YAMLTooBig as e:
        raise ConfigError(path, "(file)", f"refused: {e}") from None
    except RecursionError:
        raise ConfigError(path, "(file)", "refused: values are nested too deeply") from None


# --- `--set KEY=VALUE` --------------------------------------------------------------------------------

# YAML 1.1, which PyYAML follows, reads `1e-5` (no dot) as a string; on a command line it is a number.
_SCIENTIFIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def _numbers(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` arguments (of `mmpr build`, `eval` and `train`) as {KEY: value}.

    Each VALUE is read as YAML (`4`, `0.5`, `true`, `[0.8, 0.2, 1.0]`, `{n: 4}`, `null`, `text`),
    with `1e-5`-style numbers read as numbers, also inside lists and mappings.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. --set sampling.n=4")
        try:
            value = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - SafeLoader, bounded like a file
        except yaml.YAMLError as e:
            raise ConfigError(
                "--set", key, f"cannot read {text!r} as a value: {getattr(e, 'problem', e)}"
            ) from None
        except (_YAMLTooBig, RecursionError) as e:
            raise ConfigError("--set", key, f"refused: {e or 'values are nested too deeply'}") from None
        out[key] = _numbers(value)
    return out


_PART = re.compile(r"(?P<name>[A-Za-z_][\w-]*)(?:\[(?P<index>[^\]]*)\])?")


def set_dotted(data: Any, dotted: str, value: Any, file: str = "<recipe>") -> None:
    """Set `dotted` (e.g. "sampling.n", "sources[0].limit") in the raw mapping read from `file`; a
    path that does not fit it is a ConfigError naming the key, never a KeyError or IndexError."""
    if not isinstance(data, dict):
        raise ConfigError(
            file, dotted, f"--set needs a recipe that is a YAML mapping, not a {type(data).__name__}"
        )
    parts = dotted.split(".")
    node, where = data, ""
    for i, part in enumerate(parts):
        m = _PART.fullmatch(part)
        if m is None:
            raise ConfigError(file, dotted, f"cannot read {part!r} as a key (use KEY, KEY.SUB or KEY[N].SUB)")
        name, index = m["name"], m["index"]
        where = f"{where}.{name}" if where else name
        last = i == len(parts) - 1 and index is None
        if last:
            node[name] = value
            return
        child = node.get(name)
        if index is None:
            if child is None:
                child = node[name] = {}
            elif not isinstance(child, dict):
                raise ConfigError(file, dotted, f"{where} is {child!r}, not a mapping with keys")
        else:
            if not isinstance(child, list):
                raise ConfigError(file, dotted, f"{where} is not a list, so [{index}] does not apply")
            if not index.isdigit():
                raise ConfigError(file, dotted, f"expected {where}[N] with a number N, got [{index}]")
            if int(index) >= len(child):
                raise ConfigError(
                    file,
                    dotted,
                    f"{where}[{index}] does not exist ({where} has {len(child)} "
                    f"entr{'y' if len(child) == 1 else 'ies'})",
                )
            where = f"{where}[{index}]"
            child = child[int(index)]
            if i == len(parts) - 1:
                raise ConfigError(
                    file, dotted, f"set a key of {where} (e.g. {where}.limit), not the whole entry"
                )
            if not isinstance(child, dict):
                raise ConfigError(file, dotted, f"{where} is {child!r}, not a mapping with keys")
        node = child


# --- the builder --------------------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp: Any) -> str:
    """A declared type in words, for messages and `--list-options`: `int | None` -> "an integer or null"."""
    if _is_union(tp):
        return " or ".join(describe(t) for t in typing.get_args(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        item = describe(args[0]) if args else "value"
        return "a list of " + re.sub(r"^an? ", "", item).replace("number", "numbers").replace(
            "string", "strings"
        ).replace("integer", "integers").replace("mapping", "mappings")
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Any: "any value",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _accepts(tp: Any, value: Any) -> bool:
    """Whether `value` has the plain (non-dataclass, non-union) type `tp`; an integer is a fine float."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # kept as given (not converted): a recipe's fingerprint is the values as written
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list) and (not args or all(_accepts(args[0], v) for v in value))
    raise TypeError(f"the config builder does not know the type {tp!r}")


def _value(tp: Any, value: Any, file: str, key: str) -> Any:
    """`value` checked against the declared type `tp`; nested dataclasses (and lists of them) are built."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file, key)
    if (
        typing.get_origin(tp) is list
        and typing.get_args(tp)
        and dataclasses.is_dataclass(typing.get_args(tp)[0])
    ):
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected {describe(tp)}, got {value!r}")
        return [build(typing.get_args(tp)[0], v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    for kind in typing.get_args(tp) if _is_union(tp) else (tp,):
        if _accepts(kind, value):
            return value
    raise ConfigError(file, key, f"expected {describe(tp)}, got {value!r}")


def build(cls, data: Any, file: str | Path = "<config>", key: str = "", fixed: dict[str, Any] | None = None):
    """Instantiate dataclass `cls` from the mapping `data`: refuse unknown keys and values not of the
    declared type (`X | None`, `list[X]`, `dict`, nested dataclasses and lists of them), then let
    `cls.__post_init__` check the values. Every error names `file` and the key's full dotted path.

    `fixed` are passed to `cls` as they are (fields that are not keys of the file, such as `file`).
    """
    file = str(file)
    if not isinstance(data, dict):
        raise ConfigError(file, key or "(top level)", f"expected a mapping, got {type(data).__name__}")
    known = settable_fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        sub = _join(key, str(k))
        if k not in known:
            raise ConfigError(file, sub, f"unknown key (expected one of: {', '.join(sorted(known))})")
        kwargs[k] = _value(hints[k], v, file, sub)
    for name, f in known.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(file, _join(key, name), "required key is missing")
    try:
        return cls(**kwargs, **(fixed or {}))
    except ConfigError as e:  # from __post_init__: its key is relative to `cls`
        raise ConfigError(file, _join(key, e.key), e.reason) from None


# --- --list-options -----------------------------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(see below)"
    else:
        return "(required)"
    return (
        "null"
        if value is None
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


def options(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every settable field of `cls`, nested dataclasses flattened to
    dotted keys (a list of them as `key[N].sub`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for name, f in settable_fields(cls).items():
        tp, key = hints[name], _join(prefix, name)
        rows.append((key, describe(tp), _default_text(f), f.metadata.get("help", "")))
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            rows += options(tp, key)
        elif dataclasses.is_dataclass(item):
            rows += options(item, f"{key}[N]")
    return rows


def options_text(cls, title: str) -> str:
    """The `--list-options` listing of `cls`: one block per key, its type and default, then its help."""
    lines = [title, ""]
    for key, kind, default, help_text in options(cls):
        lines.append(f"  {key}: {kind} = {default}")
        lines.append(f"      {help_text}")
    return "\n".join(lines) + "\n"
