"""Options shared by every test directory (kept import-light: the payload tests run in the Ray venv)."""


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden files from the current renderers instead of comparing")
