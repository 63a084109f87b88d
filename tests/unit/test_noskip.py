"""The `noskip` plugin turns a skip at any phase into a failure, and leaves passes and expected failures alone."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
MESSAGE = "skips fail this suite"

SKIPPING = {
    "collection_importorskip": """
        import pytest
        pytest.importorskip("llmops_no_such_module")
        def test_never_collected(): pass
    """,
    "collection_module_skip": """
        import pytest
        pytest.skip("whole module", allow_module_level=True)
        def test_never_collected(): pass
    """,
    "setup": """
        import pytest
        @pytest.fixture
        def needs_gpu(): pytest.skip("no GPU in setup")
        def test_uses_fixture(needs_gpu): pass
    """,
    "call": """
        import pytest
        def test_skips_itself(): pytest.skip("skipped in the body")
    """,
    "teardown": """
        import pytest
        @pytest.fixture
        def cleanup():
            yield
            pytest.skip("skipped in teardown")
        def test_passes_then_teardown_skips(cleanup): pass
    """,
    "skip_marker": """
        import pytest
        @pytest.mark.skip(reason="marked")
        def test_marked(): pass
    """,
}

NOT_SKIPPING = """
    import pytest
    def test_passes(): pass
    @pytest.mark.xfail(reason="known", strict=True)
    def test_expected_failure(): assert False
"""


def run_pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    test_file = tmp_path / "test_case.py"
    test_file.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "noskip", "-p", "no:cacheprovider", "-q", "-rA", str(test_file)],
        cwd=tmp_path, env={"PYTHONPATH": str(TESTS_DIR), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("phase", sorted(SKIPPING))
def test_a_skip_at_any_phase_fails_the_run(tmp_path, phase):
    result = run_pytest(tmp_path, SKIPPING[phase])
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert MESSAGE in output, output
    assert " skipped" not in output.splitlines()[-1], output


def test_passes_and_expected_failures_still_pass(tmp_path):
    result = run_pytest(tmp_path, NOT_SKIPPING)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 passed, 1 xfailed" in output, output
