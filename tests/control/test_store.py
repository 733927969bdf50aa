"""FileStore: load, watch with debounce, and keep the last good config when a change is bad."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control.store import FileStore
from control.translate import ConfigSet


def service(name: str, address: str = "10.0.0.1", extra: str = "") -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http}}]
  endpoints: [{{address: {address}}}]
{extra}"""


async def reloads(store: FileStore, count: int, timeout: float = 10.0) -> None:
    """Wait until the store has attempted `count` reloads (it sets `reloaded` after each)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while store.reloads < count:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"{store.reloads} reload(s), expected {count}")
        store.reloaded.clear()
        if store.reloads >= count:
            break
        try:
            await asyncio.wait_for(store.reloaded.wait(), left)
        except TimeoutError:
            continue


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[FileStore, list[ConfigSet]]]:
    (tmp_path / "a.yaml").write_text(service("a"))
    store = FileStore(tmp_path, debounce=0.2)
    published: list[ConfigSet] = []
    store.subscribe(published.append)
    await store.start()
    try:
        yield store, published
    finally:
        await store.stop()


async def test_initial_load_names_files_and_version(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(service("b"))
    (tmp_path / "a.yaml").write_text(service("a") + "---\n" + service("c"))
    (tmp_path / "notes.txt").write_text("not config")
    store = FileStore(tmp_path, watch=False)
    await store.start()
    try:
        assert store.current is not None
        assert [se.meta.name for se in store.current.service_entries] == ["a", "b", "c"]
        status = store.status()
        assert status.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))
        assert len(status.version) == 16 and status.problems == ()
        # Same bytes, same version: a reload publishes nothing.
        assert store.load() is False and store.version == status.version
    finally:
        await store.stop()


async def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="nope"):
        await store.start()


async def test_a_burst_of_edits_is_one_reload(watched: tuple[FileStore, list[ConfigSet]], tmp_path: Path) -> None:
    store, published = watched
    assert len(published) == 1 and store.reloads == 0
    for index in range(5):  # a burst: five files written back to back
        (tmp_path / f"s{index}.yaml").write_text(service(f"s{index}", f"10.0.1.{index}"))
    await reloads(store, 1)
    assert len(published) == 2
    assert [se.meta.name for se in published[-1].service_entries] == ["a", "s0", "s1", "s2", "s3", "s4"]
    # The next edit is a second reload: the burst was not split.
    (tmp_path / "s0.yaml").unlink()
    await reloads(store, 2)
    assert store.reloads == 2 and len(published) == 3
    assert "s0" not in [se.meta.name for se in published[-1].service_entries]


async def test_changed_calls_within_the_debounce_window_coalesce(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service("a"))
    store = FileStore(tmp_path, debounce=0.05, watch=False)
    await store.start()
    try:
        (tmp_path / "a.yaml").write_text(service("a", "10.9.9.9"))
        for _ in range(20):
            store.changed()
        await reloads(store, 1)
        assert store.current is not None
        assert store.current.service_entries[0].endpoints[0].address == "10.9.9.9"
        assert store.reloads == 1
    finally:
        await store.stop()


async def test_bad_change_keeps_the_last_good_config_with_precise_problems(
    watched: tuple[FileStore, list[ConfigSet]], tmp_path: Path
) -> None:
    store, published = watched
    good, good_version = store.current, store.version
    path = tmp_path / "a.yaml"
    # An unknown field: file, line, resource and field.
    path.write_text(service("a", extra="  hostz: [x]\n"))
    await reloads(store, 1)
    assert store.current is good and store.version == good_version and len(published) == 1
    assert store.problems == (f"{path}:9: ServiceEntry default/a: spec.hostz: unknown field",)
    status = store.status()
    assert status.rejected_version and status.rejected_version != good_version
    # Invalid YAML.
    path.write_text(service("a") + "  ports: [unclosed\n")
    await reloads(store, 2)
    assert store.current is good
    (problem,) = store.problems
    assert problem.startswith(f"{path}:10: invalid YAML: did not find expected ',' or ']'"), problem
    # A conflict between two files: both declare the same host.
    path.write_text(service("a"))
    (tmp_path / "b.yaml").write_text(service("b").replace("b.default.svc", "a.default.svc"))
    await reloads(store, 3)
    assert store.current is good
    assert any(
        str(tmp_path / "b.yaml") in p and "ServiceEntry default/b: spec.hosts[0]" in p and "already declared" in p
        for p in store.problems
    ), store.problems
    # Fixing it makes the change current and clears the problems.
    (tmp_path / "b.yaml").write_text(service("b"))
    await reloads(store, 4)
    assert store.problems == () and store.current is not good and len(published) == 2
    assert [se.meta.name for se in store.current.service_entries] == ["a", "b"]


async def test_reverting_a_bad_change_clears_the_problems(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service("a"))
    store = FileStore(tmp_path, watch=False)
    await store.start()
    try:
        version = store.version
        (tmp_path / "a.yaml").write_text("kind: ServiceEntry\n")
        assert store.load() is False and store.problems
        (tmp_path / "a.yaml").write_text(service("a"))
        assert store.load() is False  # back to the current good version: nothing to publish
        assert store.problems == () and store.version == version
    finally:
        await store.stop()
