import os

import torch as _torch_probe  # noqa: F401  (cheap: torch does not import triton)

# Triton kernels run on CPU only in the interpreter, which must be chosen before triton loads.
if not _torch_probe.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.loader import DEFAULT_MODEL, resolve_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def real_model_dir():
    """The default model (SmolLM2-135M-Instruct), converted from its GGUF once per machine."""
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random GQA Llama saved by transformers as a Hugging Face folder (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


# The default model as served (its own GGUF blocks, the platform's dtype). Tests that compare
# two requests token for token warm the prefix cache first: attention over cached blocks and
# over a fresh prompt differ in the last bits, and int8 activations can turn that into a
# near-tie flip, as in llama.cpp.
SERVER_MODEL = "smollm2-server"


@pytest.fixture(scope="session")
def smollm2_server():
    """One live serving app on the default model, shared by the /v1 test modules."""
    from adk_backend import configure_engine
    from adk_backend.server import create_app
    from server_helpers import LiveServer
    configure_engine(SERVER_MODEL, model="smollm2-135m-instruct",
                     num_kv_blocks=2048)
    with LiveServer(create_app(agents_dir="agents", model=SERVER_MODEL)) as s:
        yield s


@pytest.fixture(scope="module", autouse=True)
def engines_end_with_their_module():
    """An engine a test module started ends with the module: the registry would keep every
    alias's weights and KV cache for the whole session (the suite's process reached 17 GB
    and was killed for memory). The session's shared ones stay."""
    import gc
    import sys

    def registered() -> set[str]:  # ADK need not be installed where no test imported it (a GPU run)
        engines = sys.modules.get("adk_backend.engines")
        return set(engines.running_engines()) if engines else set()

    before = registered()
    yield
    for name in registered() - before - {SERVER_MODEL, DEFAULT_MODEL}:
        sys.modules["adk_backend.engines"].shutdown_engine(name)
    gc.collect()


# -- the ISA levels of the C++ CPU kernels ---------------------------------------------------
# Every level this CPU runs is tested (an AVX-512 machine runs all three); a level it lacks
# is skipped with the reason. engine/platform.py decides levels; engine_kernels/cpu.py builds.
from engine.platform import cpu_model, supported_isas  # noqa: E402
from engine_kernels.cpu import ISA_LEVELS  # noqa: E402


def isa_param(level: str):
    return pytest.param(level, id=level, marks=pytest.mark.skipif(
        level not in supported_isas(), reason=f"this CPU ({cpu_model()}) lacks the {level} level"))


ISA_PARAMS = [isa_param(level) for level in ISA_LEVELS]


@pytest.fixture(scope="session", params=ISA_PARAMS)
def kernels(request):
    """The C++ kernels of one ISA level (every level this CPU runs, in turn)."""
    from engine_kernels import cpu
    k = cpu.load(request.param)
    if k is None:
        if os.environ.get("CI") == "true":  # CI machines have a compiler: never skip silently there
            raise RuntimeError("the C++ CPU kernels failed to build")
        pytest.skip("no C++ compiler for the CPU kernels")
    return k


@pytest.fixture(scope="module", params=ISA_PARAMS)
def cpu_isa(request):
    """Runs a module's engines at one ISA level (ENGINE_CPU_ISA), every level this CPU runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINE_CPU_ISA", request.param)
        yield request.param
