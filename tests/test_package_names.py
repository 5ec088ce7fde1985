"""Our import names must not shadow a package our dependencies import. transformers 5.25
requires Hugging Face's `kernels` and imports it when installed; a top-level package of ours
named `kernels` made every transformers model import fail (`cannot import name
'CUDAProperties' from 'kernels'`), the GGUF conversion of the default model included."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_models_import_beside_our_packages_from_the_repo_root():
    # From the repository root, as `make test` and `python -m adk_backend` run: the current
    # folder is first on sys.path, so a folder of ours named like a dependency shadows it.
    code = ("import engine, engine_kernels, adk_backend\n"
            "from transformers import LlamaForCausalLM, Gemma3ForCausalLM\n"
            "import importlib.util as u\n"
            "spec = u.find_spec('kernels')\n"
            "assert spec is None or not spec.origin.startswith(%r), spec.origin\n" % str(ROOT / "kernels"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
