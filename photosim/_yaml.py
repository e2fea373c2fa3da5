"""Reading hand-written YAML safely: no code, no duplicated keys, bounded size and alias expansion."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from photosim._files import require_file
from photosim.errors import PhotosimError

MAX_YAML_BYTES = 1 << 20  # a config or sweep file is hand-written: 1 MiB is far beyond any real one
MAX_YAML_VALUES = 100_000  # values of a document once its aliases are expanded (stops alias bombs early)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in lines:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given on line "
                                                        f"{lines[key]}); keep one of them", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                lines[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded; memoised per node, so linear in the document."""
    if id(node) in sizes:
        if sizes[id(node)] < 0:
            raise yaml.YAMLError("an alias refers to a value that contains it (recursive alias)")
        return sizes[id(node)]
    sizes[id(node)] = -1
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def parse_yaml(text: str, where: str) -> Any:
    """Safe YAML without duplicated keys, refusing a document whose aliases expand beyond MAX_YAML_VALUES."""
    loader = _StrictLoader(text)
    loader.name = where  # error marks name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise PhotosimError(f"{where} expands to more than {MAX_YAML_VALUES} values through its aliases "
                                "(& and *); write the values out instead.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (at most MAX_YAML_BYTES); a missing file, bad syntax or a duplicated key is a PhotosimError."""
    path = Path(path)
    require_file(path, "config file", "check the path, or name a shipped preset")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise PhotosimError(f"{path} is larger than {MAX_YAML_BYTES >> 20} MiB; a config file is limited to that.")
    try:
        return parse_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as exc:
        raise PhotosimError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise PhotosimError(f"{path} is not UTF-8 text; a config file is YAML.") from None
    except RecursionError:
        raise PhotosimError(f"{path} is nested too deeply to be a config file.") from None
