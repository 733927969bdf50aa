"""Reading YAML files into documents that remember where each field was written.

Owns: file discovery for a config directory, multi-document YAML parsing with
PyYAML's safe loader, rejection of duplicate mapping keys (which PyYAML would
otherwise resolve silently to the last one), and the map from field path to
line number used to point problems at a line. Knows nothing about Istio.

Strategy: compose each document to a node tree, record every key's line under
the same dotted path `schema.py` reports ("spec.http[0].route"), then
construct plain Python data from the same tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from control.translate.errors import Problem
from control.translate.schema import child, item

_MERGE_TAG = "tag:yaml.org,2002:merge"
_LAST_SEGMENT = re.compile(r'^(.*)(\.[A-Za-z0-9_-]+|\[\d+\]|\["[^"]*"\])$')


@dataclass(frozen=True)
class Document:
    file: str
    index: int  # 1-based position in the file
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def line(self, path: str) -> int:
        """The line of `path`, or of its nearest written ancestor; 0 if unknown."""
        while path not in self.lines:
            match = _LAST_SEGMENT.match(path)
            if match is None:
                return self.lines.get("", 0)
            path = match.group(1)
        return self.lines[path]


_SafeBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster


class _StrictLoader(_SafeBase):  # type: ignore[misc]
    """The safe loader, refusing a mapping that repeats a key."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _record_lines(node: Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                here = child(path, key_node.value)
                lines.setdefault(here, key_node.start_mark.line + 1)
                _record_lines(value_node, here, lines)
    elif isinstance(node, SequenceNode):
        for index, value_node in enumerate(node.value):
            _record_lines(value_node, item(path, index), lines)


def parse(text: str, file: str) -> tuple[list[Document], list[Problem]]:
    """All non-empty documents of `text`; on a YAML error, none of them and one problem."""
    documents: list[Document] = []
    loader = _StrictLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            index += 1
            if node is None:
                continue
            lines: dict[str, int] = {}
            _record_lines(node, "", lines)
            data = loader.construct_document(node)
            if data is not None:
                documents.append(Document(file, index, data, lines))
    except yaml.YAMLError as exc:
        return [], [_yaml_problem(exc, file)]
    finally:
        loader.dispose()
    return documents, []


def _yaml_problem(exc: yaml.YAMLError, file: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return Problem(file, "", "", message)
    return Problem(file, "", "", f"{message} at column {mark.column + 1}", line=mark.line + 1)


def read_dir(path: str | Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    """(file, text) for every *.yaml / *.yml file directly in `path`, sorted by name."""
    directory = Path(path)
    if not directory.is_dir():
        return [], [Problem(str(directory), "", "", "not a directory")]
    names = sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.suffix in (".yaml", ".yml") and entry.is_file()
    )
    return read_files(directory / name for name in names)


def read_files(paths: Iterable[Path]) -> tuple[list[tuple[str, str]], list[Problem]]:
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for file in paths:
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(file), "", "", f"cannot read: {exc}"))
    return sources, problems


def iter_documents(
    sources: Iterable[tuple[str, str]], problems: list[Problem]
) -> Iterator[Document]:
    """Every document of every source, appending YAML errors to `problems`."""
    for file, text in sources:
        documents, errors = parse(text, file)
        problems.extend(errors)
        yield from documents
