"""What rendering a streamed reply costs the UI thread: this tree's transcript against the one at a git
commit, in the same run. Prints JSON.

The reply is benchmarks/gui_responsiveness.py's ~1,000-token Markdown answer (headings, lists, a table,
code blocks), plus unfenced indented code. Each token is appended and flushed at once (the window
flushes at most 25 times a second; flushing every token is the worst case), then the finished reply is
rendered whole. Before and after alternate, `--rounds` times each, in this one process (the baseline's
transcript.py is loaded from `git show REF:app/corolla/gui/transcript.py`); the figures are CPU seconds
of this process (robust to a busy machine) and the slowest single flush (wall time).

Usage: QT_QPA_PLATFORM=offscreen python benchmarks/transcript_render.py [--baseline-ref REF] [--rounds N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]

from gui_responsiveness import markdown_tokens  # noqa: E402  (benchmarks/ is the script's own folder)

UNFENCED = (
    "\n\nHere is the helper:\ndef reverse(s):\n    return s[::-1]\n\nAnd again, indented:\n\n    x = 1\n    y = 2\n"
)


def load_transcript(ref: str | None, tmp: Path):
    if ref is None:
        from corolla.gui import transcript

        return transcript
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:app/corolla/gui/transcript.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp / f"transcript_{ref[:8]}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_run(module, app) -> dict:
    view = module.Transcript()
    view.resize(900, 700)
    view.show()
    app.processEvents()
    pieces = [*markdown_tokens(), UNFENCED]
    reply = {"role": "assistant", "content": "", "status": "streaming", "created_at": time.time()}
    view.set_messages([{"role": "user", "content": "Explain", "status": "complete", "created_at": time.time()}, reply])
    cpu, slowest = time.process_time(), 0.0
    for piece in pieces:
        reply["content"] += piece
        began = time.perf_counter()
        view.flush()
        slowest = max(slowest, time.perf_counter() - began)
    reply["status"] = "complete"
    view.flush()
    streamed = time.process_time() - cpu
    cpu = time.process_time()
    view.set_messages(view.messages)
    whole = time.process_time() - cpu
    view.deleteLater()
    app.processEvents()
    return {"stream_cpu_s": streamed, "slowest_flush_ms": slowest * 1000, "whole_render_cpu_s": whole}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-ref", default="68d8494")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    with tempfile.TemporaryDirectory() as tmp:
        modules = {"baseline": load_transcript(args.baseline_ref, Path(tmp)), "this_tree": load_transcript(None, None)}
        runs: dict[str, list[dict]] = {name: [] for name in modules}
        one_run(modules["this_tree"], app)  # warm-up: fonts, Pygments' lexer
        for _ in range(args.rounds):
            for name, module in modules.items():
                runs[name].append(one_run(module, app))
    result = {"tokens": len(markdown_tokens()) + 1, "baseline_ref": args.baseline_ref, "rounds": args.rounds}
    for name, values in runs.items():
        result[name] = {
            key: round(statistics.median(v[key] for v in values), 3) for key in ("stream_cpu_s", "whole_render_cpu_s")
        }
        result[name]["slowest_flush_ms"] = round(max(v["slowest_flush_ms"] for v in values), 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
