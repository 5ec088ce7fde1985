"""Grammar compilation in child processes, so that a compile past its time limit is stopped,
not merely no longer waited for. xgrammar's compile cannot be interrupted: a thread left
compiling a hostile schema (a JSON schema of a few hundred patterned properties takes
10 s) would hold a worker and a core, and a few such requests would starve every later
structured request. A process can be killed.

One pool serves every engine of this process: `compile()` runs on `POOL`'s threads, each
with a child of its own (started on first use, about 2 s, not counted against any
compile's time; started again at once after a kill). The child runs this file by path
(not as `engine.grammar_worker`: it imports xgrammar only, never torch; `-P`: not the
modules beside it either). Over its stdin and stdout, one JSON document per line: requests
`{"tokenizer": path, "kind": "json_schema" | "regex" | "grammar" | "structural_tag",
"source": str}`, where `path` holds xgrammar's `TokenizerInfo.serialize_json` (the child
keeps the last few tokenizers loaded), each answered `{"grammar":
CompiledGrammar.serialize_json()}` or `{"error": message}`. The child exits when its stdin
closes (the parent is gone).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

WORKERS = 4  # compiles at once: one slow schema does not hold up everyone else's
STARTUP_TIMEOUT_S = 120.0  # a child that has not imported xgrammar by then never will: nothing waits forever
_TOKENIZERS_KEPT = 4


# JSON's separators where a grammar fixes them: json.dumps's, which chat templates (`tojson`)
# and tool_formats also write, so a call the model generated and the same call rendered back
# into the next prompt are the same tokens, and that prompt is a prefix-cache hit through it.
SEPARATORS = (", ", ": ")


def fixed_separators(fmt, json_to_ebnf):
    """A structural tag's formats with every plain JSON content (a `json_schema` format that
    asks for no whitespace of its own: no `max_whitespace_cnt`, default style, no excludes,
    no any_order) as a grammar of fixed separators, as JSON mode is; `json_to_ebnf(schema)`
    converts one schema."""
    if isinstance(fmt, list):
        return [fixed_separators(f, json_to_ebnf) for f in fmt]
    if not isinstance(fmt, dict):
        return fmt
    if (fmt.get("type") == "json_schema" and fmt.get("max_whitespace_cnt") is None and fmt.get("style", "json") == "json"
            and not fmt.get("excludes") and not fmt.get("any_order") and set(fmt) <= {
                "type", "json_schema", "style", "max_whitespace_cnt", "excludes", "any_order"}):
        return {"type": "grammar", "grammar": json_to_ebnf(fmt["json_schema"])}
    return {k: fixed_separators(v, json_to_ebnf) for k, v in fmt.items()}


def _serve() -> None:
    import xgrammar as xgr

    def json_to_ebnf(schema) -> str:
        return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS))
    compilers: OrderedDict[str, xgr.GrammarCompiler] = OrderedDict()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        path = request["tokenizer"]
        if path not in compilers:
            with open(path) as f:
                info = xgr.TokenizerInfo.deserialize_json(f.read())
            compilers[path] = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # the parent caches
            if len(compilers) > _TOKENIZERS_KEPT:
                compilers.popitem(last=False)
        compilers.move_to_end(path)
        compiler = compilers[path]
        compile_by_kind = {
            # fixed separators: a small model cannot run away into whitespace
            "json_schema": lambda s: compiler.compile_json_schema(s, any_whitespace=False, separators=SEPARATORS),
            "regex": compiler.compile_regex, "grammar": compiler.compile_grammar,
            "structural_tag": lambda s: compiler.compile_structural_tag(
                json.dumps(fixed_separators(json.loads(s), json_to_ebnf))),
        }
        try:
            reply = {"grammar": compile_by_kind[request["kind"]](request["source"]).serialize_json()}
        except (RuntimeError, ValueError, TypeError) as exc:
            reply = {"error": str(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class CompileTimeout(Exception):
    """The compile ran past its time; its process was killed."""


class CompileProcess:
    """One child compiling one grammar at a time (use from one thread at a time)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-u", "-P", os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
        self.ready = False

    def compile(self, tokenizer_info_path: str, kind: str, source: str, timeout: float) -> str:
        """The serialized compiled grammar. ValueError: xgrammar refused the source, with its
        message; CompileTimeout: not compiled within `timeout` seconds, and the child is dead."""
        if not self.ready:  # started moments ago: its start-up is not this compile's time (but bounded)
            started, _, _ = select.select([self.proc.stdout], [], [], STARTUP_TIMEOUT_S)
            if not started or self.proc.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError(f"the grammar compiler process failed to start within {STARTUP_TIMEOUT_S:.0f} s "
                                   f"(exit status {self.proc.returncode})")
            self.ready = True
        request = {"tokenizer": tokenizer_info_path, "kind": kind, "source": source}
        self.proc.stdin.write(json.dumps(request) + "\n")
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


POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="grammar-compile")
_local = threading.local()
_processes: list[CompileProcess] = []
_lock = threading.Lock()


def _process(fresh: bool = False) -> CompileProcess:
    """This pool thread's child; `fresh`: a new one now (after a kill, ready by the next compile)."""
    proc = getattr(_local, "proc", None)
    if fresh or proc is None or not proc.alive():
        proc = _local.proc = CompileProcess()
        with _lock:
            _processes[:] = [p for p in _processes if p.alive()] + [proc]
    return proc


def compile(tokenizer_info_path: str, kind: str, source: str, timeout: float) -> str:  # noqa: A001
    """Run on a POOL thread: the grammar compiled in that thread's child (see CompileProcess)."""
    try:
        return _process().compile(tokenizer_info_path, kind, source, timeout)
    except CompileTimeout:
        _process(fresh=True)
        raise


def processes() -> list[CompileProcess]:
    with _lock:
        return list(_processes)


@atexit.register
def _close_all() -> None:
    for proc in processes():
        proc.close()


if __name__ == "__main__":
    _serve()
