"""The config store: where the mesh's Istio YAML comes from, and what happened to the last change.

Owns: the `ConfigStore` interface (current good `ConfigSet`, its version,
the problems of the last rejected change, subscribers) and `FileStore`, which
reads a directory of multi-document YAML with the shared translator's loader
and watches it with watchfiles. It must not translate to xDS or talk to
proxies; the server subscribes and does that.

Strategy: a change is never applied in part. Every reload reads the whole
directory and loads it as one configuration; if that fails the previous good
`ConfigSet` stays current and `problems` lists each mistake (file:line,
resource, field, message). A burst of file events becomes one reload: a
reload starts only after `debounce` seconds without a new event. The
version is a hash of the files' names and bytes, so touching a file without
changing it does not notify anyone.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfiles import awatch

from control.translate import ConfigError, ConfigSet, load_sources
from control.translate.documents import read_dir

log = logging.getLogger("pillion.control.store")

Subscriber = Callable[[ConfigSet], None]


@dataclass(frozen=True)
class StoreStatus:
    """What `/debug/config` shows about the store."""

    source: str
    version: str  # of the current good config; "" before the first good load
    loaded_at: float  # wall clock of the current good config (0 if none)
    files: tuple[str, ...]
    problems: tuple[str, ...]  # of the last rejected change; () when the last change was good
    rejected_version: str  # hash of the rejected change's files
    rejected_at: float
    reloads: int  # attempts (good or bad) after the first load


class ConfigStore(abc.ABC):
    """A source of Istio configuration (a directory today; a Kubernetes API later)."""

    def __init__(self) -> None:
        self.current: ConfigSet | None = None
        self.version = ""
        self.problems: tuple[str, ...] = ()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber(config)` on every new good config (not for the one already current)."""
        self._subscribers.append(subscriber)

    def _publish(self, config: ConfigSet) -> None:
        for subscriber in list(self._subscribers):
            subscriber(config)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the first configuration (good or not) and begin watching."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def status(self) -> StoreStatus: ...


def sources_version(sources: list[tuple[str, str]]) -> str:
    hasher = hashlib.sha256()
    for name, text in sources:
        for part in (name, text):
            data = part.encode("utf-8", "surrogateescape")
            hasher.update(len(data).to_bytes(8, "big"))
            hasher.update(data)
    return hasher.hexdigest()[:16]


@dataclass
class _Attempt:
    """One read of the directory: its version, and the config or the problems."""

    version: str
    files: tuple[str, ...]
    config: ConfigSet | None = None
    problems: list[str] = field(default_factory=list)


class FileStore(ConfigStore):
    """A directory of multi-document Istio YAML, reloaded when its files change."""

    def __init__(self, directory: str | Path, *, debounce: float = 0.1, watch: bool = True) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.debounce = debounce
        self.watch = watch
        self.reloads = 0
        self.reloaded = asyncio.Event()  # set after every reload attempt (tests wait on it)
        self._files: tuple[str, ...] = ()
        self._loaded_at = 0.0
        self._rejected_version = ""
        self._rejected_at = 0.0
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if not self.directory.is_dir():
            raise NotADirectoryError(f"config directory {self.directory} does not exist or is not a directory")
        self._tasks = [asyncio.create_task(self._debounce())]
        if self.watch:
            watcher = awatch(self.directory, stop_event=self._stop, debounce=400, step=20)
            first = asyncio.ensure_future(anext(watcher))
            await asyncio.sleep(0)  # the watch is registered before the generator's first await
            self._tasks.append(asyncio.create_task(self._watch(watcher, first)))
        self.load()

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def changed(self) -> None:
        """Note a change; a reload follows `debounce` seconds after the last one."""
        self._poke.set()

    async def _watch(self, watcher: AsyncIterator[Any], first: asyncio.Future[Any]) -> None:
        try:
            await first
            self.changed()
            async for _ in watcher:
                self.changed()
        except StopAsyncIteration:
            pass
        except OSError as exc:  # the directory went away: keep serving the last good config
            log.error("stopped watching %s: %s", self.directory, exc)

    async def _debounce(self) -> None:
        while True:
            await self._poke.wait()
            self._poke.clear()
            while True:
                try:
                    await asyncio.wait_for(self._poke.wait(), self.debounce)
                except TimeoutError:
                    break
                self._poke.clear()
            self.reloads += 1
            await self._load_in_thread()

    def load(self) -> bool:
        """Read and load the directory now; True if a new good config became current."""
        return self._apply(self._read())

    async def _load_in_thread(self) -> bool:
        """`load`, with the reading and parsing off the event loop (a large mesh takes a second)."""
        return self._apply(await asyncio.to_thread(self._read))

    def _read(self) -> _Attempt:
        """Read and validate the directory. Touches no state, so it may run in a thread."""
        sources, unreadable = read_dir(self.directory)
        attempt = _Attempt(sources_version(sources), tuple(n for n, _ in sources))
        if unreadable:
            attempt.problems = [str(problem) for problem in unreadable]
        elif attempt.version != self.version:
            try:
                attempt.config = load_sources(sources)
            except ConfigError as exc:
                attempt.problems = [str(problem) for problem in exc.problems]
        return attempt

    def _apply(self, attempt: _Attempt) -> bool:
        try:
            if attempt.problems:
                return self._reject(attempt.version, attempt.problems)
            if attempt.config is None:  # unchanged: back to (or still at) the current good version
                self.problems = ()
                return False
            self.current, self.version = attempt.config, attempt.version
            self.problems, self._files, self._loaded_at = (), attempt.files, time.time()
            log.info("loaded %s: %d file(s), version %s", self.directory, len(attempt.files), attempt.version)
            self._publish(attempt.config)
            return True
        finally:
            self.reloaded.set()

    def _reject(self, version: str, problems: list[str]) -> bool:
        if version and version == self._rejected_version and self.problems:
            return False  # the same bad change again: already reported
        self.problems = tuple(problems)
        self._rejected_version, self._rejected_at = version, time.time()
        kept = f"keeping version {self.version}" if self.version else "no good config loaded yet"
        log.error(
            "rejected the change in %s (%d problem(s); %s):\n  %s",
            self.directory,
            len(problems),
            kept,
            "\n  ".join(problems),
        )
        return False

    def status(self) -> StoreStatus:
        return StoreStatus(
            source=str(self.directory),
            version=self.version,
            loaded_at=self._loaded_at,
            files=self._files,
            problems=self.problems,
            rejected_version=self._rejected_version if self.problems else "",
            rejected_at=self._rejected_at if self.problems else 0.0,
            reloads=self.reloads,
        )
