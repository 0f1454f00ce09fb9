#!/usr/bin/env python
"""Structure figures of a checkout: lines per module, the longest functions, ruff's C901 (McCabe) maxima.

    python scripts/code_metrics.py [ROOT]   # default: this repository

Duplicated runs of lines come from the separate `duplicates` tool.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    files = sorted([*root.glob("ldm_vae/**/*.py"), *root.glob("scripts/*.py")])
    functions = []
    for f in files:
        src = f.read_text()
        print(f"{len(src.splitlines()):5d} {f.relative_to(root)}")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{f.relative_to(root)}:{node.name}"))
    print("total", sum(len(f.read_text().splitlines()) for f in files))
    print("longest functions:", sorted(functions, reverse=True)[:5])
    ruff = [
        sys.executable,
        "-m",
        "ruff",
        "check",
        "--select",
        "C901",
        "--output-format",
        "json",
        "--no-cache",
    ]
    ruff += ["--config", "lint.mccabe.max-complexity=0", *map(str, files)]
    found = json.loads(subprocess.run(ruff, capture_output=True, text=True).stdout or "[]")
    scores = sorted(
        (
            (int(re.search(r"\((\d+) > 0\)", d["message"])[1]), Path(d["filename"]).relative_to(root), name)
            for d in found
            for name in [d["message"].split("`")[1]]
        ),
        reverse=True,
    )
    print("C901 top:", [f"{score} {path}:{name}" for score, path, name in scores[:5]])


if __name__ == "__main__":
    main()
