"""What the kopf wiring relies on: every handler is an index or an on.event, so kopf needs no diff base."""

from __future__ import annotations

import asyncio

import kopf

from llmops.handlers import main


def test_no_handler_needs_kopfs_diff_of_old_and_new():
    registry = kopf.get_default_registry()
    assert registry._changing.get_all_handlers() == []   # no on.create/update/delete/resume/field
    assert registry._spawning.get_all_handlers() == []   # no daemons or timers
    assert registry._watching.get_all_handlers()         # the on.event triggers are there


def test_startup_replaces_the_diff_base_with_one_that_builds_nothing():
    settings = kopf.OperatorSettings()
    assert isinstance(settings.persistence.diffbase_storage, kopf.DiffBaseStorage)
    body = kopf.Body({"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"big": list(range(9))}})
    assert settings.persistence.diffbase_storage.build(body=body) is not None   # kopf's default: a deep copy

    storage = main.NoDiffBase()
    assert storage.build(body=body) is None and storage.fetch(body=body) is None
    assert storage.store(body=body, patch=kopf.Patch(), essence={}) is None


def test_startup_installs_it(monkeypatch):
    settings = kopf.OperatorSettings()
    monkeypatch.setattr(main.kopf, "login_with_service_account", lambda **_: None)
    monkeypatch.setattr(main.kopf, "login_with_kubeconfig", lambda **_: None)
    try:   # no credentials here: startup stops after the settings, before it builds the engine
        asyncio.run(main.startup(settings=settings, logger=None, memo=kopf.Memo()))
    except kopf.PermanentError:
        pass
    assert isinstance(settings.persistence.diffbase_storage, main.NoDiffBase)


def test_render_registers_no_handlers():
    """`llmops render` builds objects offline: importing the kopf wiring would register every handler as a side
    effect (and needs kopf where only the builders are wanted)."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "viggo" / "finetune.yaml"
    code = ("import contextlib, io, sys\nfrom llmops import cli\nsys.argv = ['llmops', 'render', '-f', sys.argv[1]]\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    cli.main()\n"
            "print(sorted(m for m in sys.modules if m == 'kopf' or m.startswith('llmops.handlers.main')))\n")
    done = subprocess.run([sys.executable, "-c", code, str(example)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


class Scheduled:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def is_echo(self, body) -> bool:
        return False

    def schedule(self, key, listed=False) -> None:
        self.calls.append((key[2], listed))

    def schedule_dependents(self, key, listed=False) -> None:
        pass


def test_a_start_serves_resources_that_need_work_before_those_at_rest():
    """A resource created (or changed) while no operator ran is listed at start-up like those at rest, but is
    not queued behind them."""
    engine = Scheduled()
    on_event = main._owner_event("FineTune")
    at_rest = {"metadata": {"name": "old", "generation": 2}, "status": {"observedGeneration": 2}}
    changed = {"metadata": {"name": "changed", "generation": 3}, "status": {"observedGeneration": 2}}
    new = {"metadata": {"name": "new", "generation": 1}}
    for body in (at_rest, changed, new):
        asyncio.run(on_event(type=None, namespace="ns", name=body["metadata"]["name"], memo=kopf.Memo(engine=engine),
                             body=body))
    asyncio.run(on_event(type="MODIFIED", namespace="ns", name="old", memo=kopf.Memo(engine=engine), body=at_rest))
    assert engine.calls == [("old", True), ("changed", False), ("new", False), ("old", False)]
