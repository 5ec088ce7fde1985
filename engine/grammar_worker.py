"""Grammar compilation in a child process, so that a compile past its time limit is stopped,
not merely no longer waited for. xgrammar's compile cannot be interrupted: a thread left
compiling a hostile schema (a JSON schema of a few hundred patterned properties takes
10 s) would hold a worker and a core, and a few such requests would starve every later
structured request. A process can be killed.

The parent (`CompileProcess`) runs this file by path (not as `engine.grammar_worker`: the
child imports xgrammar only, never torch; `-P`: not the modules beside it either), with
the path of the tokenizer (xgrammar's `TokenizerInfo.serialize_json`, in a file: a pipe
would hold the parent until the child has imported xgrammar). The child says `ready` once
loaded (about 2 s, not counted against any compile's time). Then over its stdin and
stdout, one JSON document per line: requests `{"kind": "json_schema" | "regex" | "grammar" | "structural_tag", "source": str}`,
each answered `{"grammar": CompiledGrammar.serialize_json()}` or `{"error": message}`.
The child exits when its stdin closes (the parent is gone).
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys


def _serve() -> None:
    import xgrammar as xgr
    with open(sys.argv[1]) as f:
        info = xgr.TokenizerInfo.deserialize_json(f.read())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # the parent caches
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    compile_by_kind = {
        # fixed separators: a small model cannot run away into whitespace
        "json_schema": lambda s: compiler.compile_json_schema(s, any_whitespace=False),
        "regex": compiler.compile_regex, "grammar": compiler.compile_grammar,
        "structural_tag": compiler.compile_structural_tag,
    }
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"grammar": compile_by_kind[request["kind"]](request["source"]).serialize_json()}
        except (RuntimeError, ValueError, TypeError) as exc:
            reply = {"error": str(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class CompileTimeout(Exception):
    """The compile ran past its deadline; its process was killed."""


class CompileProcess:
    """One child compiling one grammar at a time (use from one thread at a time)."""

    def __init__(self, tokenizer_info_path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", "-P", os.path.abspath(__file__), tokenizer_info_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
        self.ready = False

    def compile(self, kind: str, source: str, timeout: float) -> str:
        """The serialized compiled grammar. ValueError: xgrammar refused the source, with its
        message; CompileTimeout: not compiled within `timeout` seconds, and the child is dead."""
        if not self.ready:  # started moments ago: its start-up is not this compile's time
            if self.proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the grammar compiler process failed to start ({self.proc.wait()})")
            self.ready = True
        self.proc.stdin.write(json.dumps({"kind": kind, "source": source}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise CompileTimeout(kind)
        line = self.proc.stdout.readline()  # the child writes each reply whole, then flushes
        if not line:
            raise RuntimeError(f"the grammar compiler process exited with status {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["grammar"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


if __name__ == "__main__":
    _serve()
