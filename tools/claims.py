"""List every measured figure in README.md and docs/*.md that has no source.

A *figure* is a number with a unit of time, size, rate or ratio (`0.75 s`, `233 MB`, `52.6 samples/s`, `19.1x`,
`7%`) or a bare number with two or more decimals (`0.688`, `8.316`), outside code blocks and inline code.
Not figures (the allow-list): versions (`0.9.4`, `Ray 2.57`), dates, commit ids, configuration values written as
`key value` pairs that the docs set rather than measure (`lr 1e-4`, `cutoff_len 2048`), and hardware sizes
(`24 GiB` of an L4) — see ALLOWED below.

A figure's *source* must be in the same block: a paragraph, a list item, or a table row (a row may also take its
source from the table's header or from the paragraph right above the table). A source is one of:
* a committed file under bench/, tests/, tools/, examples/ or operator/ (`bench/results/x.json`; a glob such as
  `bench/results/training_recipe*.json` counts when it matches a file), or a removed result file followed by the
  commit that holds it (`bench/results/old.json`, 5b9ece4);
* a command in inline code that runs one of those (`python3 bench/training_recipe.py`, `tools/test.sh`).

Usage: python3 tools/claims.py [FILE.md ...]    (default: README.md and docs/*.md; exit 1 when any is unsourced)
"""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NUMBER = r"(?<![\w.])\d[\d,]*(?:\.\d+)?"
UNITS = (r"(?:µs|ms|s|min|h|minutes?|seconds?|hours?|%|x|×|GiB|MiB|KiB|GB|MB|kB|KB|TFLOP/s|samples/s|tokens/s|"
         r"rows/s|requests?/s|requests? per minute|req/min|writes?|applies|renewals?/min)")
FIGURE = re.compile(rf"{NUMBER}(?:[ ]?(?:-|–|to)[ ]?{NUMBER})?[ ]?{UNITS}(?![\w/])|(?<![\w.])\d+\.\d{{2,}}(?!\w|\.\d)")

# Numbers that describe, not measure: each pattern is removed from a block before figures are looked for.
ALLOWED = [
    r"\d+\.\d+\.\d+(?:\.\d+)*",                              # versions 0.9.4, 2.57.0
    r"(?i:python|pytorch|torch|transformers|peft|ray|vllm|kubernetes|kuberay|liger-kernel|cuda|kopf|helm|go|trl|"
    r"accelerate|datasets|llama-factory|llamafactory|tokenizers|triton|flashinfer|pandas|pyarrow|pydantic|"
    r"openai|xgrammar|k8s|kind|etcd|driver)[\s=<>≤≥v]*\d+\.\d+",   # software versions
    r"\d{4}-\d{2}-\d{2}",                                    # dates
    r"\b\d+\s?(?:GiB|GB)\b(?=\s*(?:of GPU memory|GPU|HBM|L4|A10G|L40S|A100|H100|H200|memory|RAM|disk))",
    r"\b(?:L4|A10G|L40S|A100|H100|H200)s?\b[^.;|]{0,12}?\b\d+\s?(?:GiB|GB)",  # an accelerator's memory size
    r"\b\d+\s?(?:GiB|GB)\s+(?:L4|A10G|L40S|A100|H100|H200)",
    r"\b\d+\s?(?:cores?|CPUs?|GPUs?)\b",                     # machine shapes
]
ALLOWED_RE = re.compile("|".join(f"(?:{p})" for p in ALLOWED))

# Settings, defaults and examples that look like measurements, by file: figure -> why it is not one.
SETTINGS = {
    "README.md": {},
    "docs/benchmarks.md": {"30 s": "how long the device machine keeps /tmp after a call (its documented setting)"},
    "docs/clusters.md": {
        "32 GiB": "the example's memory request", "36 GiB": "a memory request", "20 GiB": "a disk request",
        "1.2 x": "a sizing rule", "48 GB": "an instance type's memory", "64 GB": "an instance type's memory",
        "3.12": "a Python version", "2.60": "a Ray version", "6 GB": "a package set's size, approximate",
        "600 s": "Ray's default timeout",
    },
    "docs/finetune.md": {
        "2 x": "the default alpha rule", "180000000 s": "the reference config's ddp_timeout",
        "900 s": "a default setting", "1.20": "an example status message", "0.3000": "an example status message",
        "30 s": "the progress interval setting", "2 s": "a requeue setting",
    },
    "docs/install.md": {
        "40%": "a sizing rule", "64 MiB": "a container's default /dev/shm", "30%": "Ray's default object store share",
        "20 GiB": "a disk request", "1.2 x": "a sizing rule", "100 GB": "a disk request", "20 GB": "a disk request",
    },
    "docs/llmservice.md": {
        "2.60": "a Ray version", "600 s": "Ray Serve's default downscale_delay_s",
        "60 s": "KubeRay's default idleTimeoutSeconds, and the bench's scaleToZeroDelaySeconds",
        "600s": "an example status message (the default scaleToZeroDelaySeconds)",
        "10 minutes": "the Unschedulable grace setting (SCALE_UP_GRACE_SECONDS)",
    },
    "docs/payloads.md": {"0.5 s": "the retry back-off setting"},
    "docs/reliability.md": {"8 x": "simulated node count", "6 s": "the quiet window setting"},
    "docs/training-recipe.md": {
        "1 ×": "a config value (micro-batch × accumulation)", "4.53": "a transformers version",
        "7.62": "the model's parameter count (billions)", "2048 ×": "a matrix shape",
        "64 MiB": "the device machine's carry limit per call",
    },
}

SOURCE_PATH = re.compile(r"\b((?:bench|tests|tools|examples|operator)/[\w./*\-]+)")
COMMIT_AFTER = re.compile(r"`?,?\s*(?:at\s+)?(?:commit\s+)?([0-9a-f]{7,40})\b")
RESULT_NAME = re.compile(r"(?<![\w/.])([\w\-]+(?:\.[\w\-]+)*\.json)\b")
INLINE_CODE = re.compile(r"`[^`]*`")


@dataclass
class Block:
    path: str
    line: int
    text: str
    kind: str  # "paragraph", "item" or "row"
    inherited: str = ""  # a table row's header and the paragraph above its table


def blocks(path: Path) -> list[Block]:
    """Split a Markdown file into paragraphs, list items and table rows; code blocks and headings are skipped."""
    out: list[Block] = []
    current: Block | None = None
    last_paragraph = ""
    table_header = None
    in_code = False
    rel = str(path.relative_to(ROOT)) if path.is_absolute() and ROOT in path.parents else str(path)
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if line.lstrip().startswith("```"):
            in_code = not in_code
            current = None
            continue
        if in_code:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if current is not None and current.kind == "paragraph":
                last_paragraph = current.text
            current = None
            if not stripped.startswith("|"):
                table_header = None
            continue
        if stripped.startswith("|"):
            if current is not None and current.kind == "paragraph":
                last_paragraph = current.text
                current = None
            if table_header is None:
                table_header = stripped
                continue
            if set(stripped) <= set("|-: "):
                continue
            out.append(Block(rel, number, stripped, "row", inherited=table_header + "\n" + last_paragraph))
            continue
        table_header = None
        if re.match(r"(?:[*-]|\d+\.)\s", stripped):
            if current is not None and current.kind == "paragraph":
                last_paragraph = current.text
            current = Block(rel, number, stripped, "item", inherited=last_paragraph)
            out.append(current)
            continue
        if current is None or current.kind == "row":
            current = Block(rel, number, stripped, "paragraph")
            out.append(current)
        else:
            current.text += "\n" + stripped
    return out


def figures(text: str) -> list[str]:
    """The measured figures of a block: outside inline code, after the allow-list is taken out."""
    prose = INLINE_CODE.sub(" ", text)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
    prose = ALLOWED_RE.sub(" ", prose)
    return [m.group(0) for m in FIGURE.finditer(prose)]


def _known_commit(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True).returncode == 0


def has_source(text: str) -> bool:
    for match in SOURCE_PATH.finditer(text):
        ref = match.group(1).rstrip(".,)")
        if any(ROOT.glob(ref)) if "*" in ref else (ROOT / ref).exists():
            return True
        commit = COMMIT_AFTER.match(text, match.end())
        if commit and _known_commit(commit.group(1)):
            return True
    return any((ROOT / "bench" / "results" / m.group(1)).is_file() for m in RESULT_NAME.finditer(text))


def unsourced(paths: list[Path]) -> list[tuple[Block, list[str]]]:
    found = []
    for path in paths:
        for block in blocks(path):
            allowed = SETTINGS.get(block.path, {})
            numbers = [n for n in figures(block.text) if n not in allowed]
            if numbers and not has_source(block.text) and not (block.inherited and has_source(block.inherited)):
                found.append((block, numbers))
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = unsourced(paths)
    for block, numbers in found:
        first = block.text.splitlines()[0][:100]
        print(f"{block.path}:{block.line}: {', '.join(numbers)} without a source: {first}")
    if found:
        print(f"\n{len(found)} blocks state figures without a committed result file, test, tool or command "
              f"beside them (tools/claims.py says what counts).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
