"""Rewrite benchmark result files compactly: one line per top-level key, one line per record of a list.

The benches write their results through compact(); to rewrite an older file:
python3 bench/compact_json.py bench/results/FILE.json ...
The content is unchanged (json.load gives the same object); only the layout shrinks.
"""
import json
import sys
from pathlib import Path


def _line(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _block(value, indent):
    pad = " " * indent
    if isinstance(value, dict) and value:
        items = [f'{pad} {_line(k)}:{_block(v, indent + 1).lstrip()}' for k, v in value.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return pad + "[\n" + ",\n".join(pad + " " + _line(v) for v in value) + "\n" + pad + "]"
    return pad + _line(value)


def compact(value) -> str:
    """Top-level keys and second-level keys on their own lines; records of a list one per line."""
    if not isinstance(value, dict):
        return _block(value, 0) + "\n"
    items = [f' {_line(k)}:{_nested(v)}' for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n}\n"


def _nested(value) -> str:
    if isinstance(value, dict) and value and len(_line(value)) > 200:
        items = [f'  {_line(k)}:{_block(v, 2).lstrip()}' for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n }"
    return _block(value, 1).lstrip()


def main(paths):
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        text = compact(data)
        assert json.loads(text) == data, path
        path.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
