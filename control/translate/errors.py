"""The translator's error vocabulary: one `Problem` per mistake, one `ConfigError` for all of them.

Owns: how a configuration mistake is named (file, resource, field path, message)
and printed. It must not decide what is a mistake; the loaders and builders do.

Strategy: nothing in the translator raises on the first mistake. Every stage
appends `Problem`s to a list and the public entry points raise one
`ConfigError` carrying the whole list, so a user fixes a directory in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One precise configuration mistake.

    `file` is the YAML file ("<string>" for text), `resource` is "Kind ns/name"
    (empty for file-level problems such as a YAML syntax error), `field` is a
    dotted path like "spec.http[0].route[0].destination.host" (empty when the
    whole resource is at fault), `line` is 1-based and 0 when unknown.
    """

    file: str
    resource: str
    field: str
    message: str
    line: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        parts = [where, self.resource, self.field, self.message]
        return ": ".join(part for part in parts if part)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every mistake found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)
