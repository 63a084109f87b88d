"""The kopf wiring: kopf runs the operator's life, the informers feed the triggers."""

from __future__ import annotations

import asyncio

import kopf
import pytest

from llmops.handlers import main


def test_kopf_runs_the_operators_life_and_watches_nothing():
    """The watches are the informers' (handlers/informers.py): kopf has no resource handler to run per object."""
    registry = kopf.get_default_registry()
    assert registry._watching.get_all_handlers() == []
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    assert registry._indexing.get_all_handlers() == []
    assert {"login", "startup", "cleanup"} <= {h.id for h in registry._activities.get_all_handlers()}


def test_startup_without_credentials_stops_with_the_fix(monkeypatch):
    settings = kopf.OperatorSettings()
    monkeypatch.setattr(main.kopf, "login_with_service_account", lambda **_: None)
    monkeypatch.setattr(main.kopf, "login_with_kubeconfig", lambda **_: None)
    with pytest.raises(kopf.PermanentError, match="KUBECONFIG"):
        asyncio.run(main.startup(settings=settings, logger=None, memo=kopf.Memo()))
    assert settings.scanning.disabled and not settings.posting.enabled


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
    meta = {"namespace": "ns"}
    at_rest = {"metadata": {**meta, "name": "old", "generation": 2}, "status": {"observedGeneration": 2}}
    changed = {"metadata": {**meta, "name": "changed", "generation": 3}, "status": {"observedGeneration": 2}}
    new = {"metadata": {**meta, "name": "new", "generation": 1}}
    for body in (at_rest, changed, new):
        main.on_owner(engine, "FineTune", None, body)
    main.on_owner(engine, "FineTune", "MODIFIED", at_rest)
    assert engine.calls == [("old", True), ("changed", False), ("new", False), ("old", False)]
