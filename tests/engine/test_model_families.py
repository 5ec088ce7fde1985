"""Qwen3, Gemma 3 and Llama 3.x checkpoints saved by transformers, loaded by the engine,
give transformers' own greedy tokens, token for token (fp32): in a staggered batch with
chunked prefill, under preemption, and for Gemma 3 with prompts far past its sliding window."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from helpers import assert_all_blocks_free, greedy_tokens, hf_greedy, run_staggered
from tiny_models import GEMMA_WINDOW, save_tiny, write_gguf

FAMILIES = ["qwen3", "gemma3", "llama3"]
LENGTHS = [1, 5, 15, 16, 17, 33, 50, 70]
MAX_NEW = 20


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reference(family_dir):
    """transformers' greedy tokens for every prompt."""
    _, path = family_dir
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in LENGTHS]
    expected = [hf_greedy(hf, p, MAX_NEW, None) for p in prompts]
    assert sum(len(set(e)) for e in expected) >= 6 * len(prompts), "degenerate outputs prove little"
    return prompts, expected


PARAMS = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_greedy_equals_transformers_in_a_staggered_chunked_batch(family_dir, reference, backend):
    family, path = family_dir
    prompts, expected = reference
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=256, block_size=16,
                                    max_model_len=1024, max_num_batched_tokens=24, attention_backend=backend,
                                    device="cpu" if backend == "cpu" else None))
    assert engine.model_config.architecture == ("gemma3" if family == "gemma3" else "llama")
    got = run_staggered(engine, prompts, PARAMS, [0, 0, 1, 1, 3, 4, 8, 12])
    for i, n in enumerate(LENGTHS):
        assert got[f"p{i}"] == expected[i], f"{family}: prompt of {n} tokens"
    assert any(s.num_prefill_tokens and s.num_decodes for s in engine.step_history)  # chunks beside decodes
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_equals_transformers_under_preemption(family_dir, reference, mode):
    family, path = family_dir
    prompts, expected = reference
    # Together the prompts need about 25 blocks of 16 tokens: give the pool 10.
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=10, block_size=16, max_model_len=128,
              preemption_mode=mode, swap_space=1 << 24)
    outs = llm.generate(prompts, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == expected, family
    assert llm.stats()["num_preemptions"] > 0
    assert_all_blocks_free(llm.engine)


@pytest.mark.parametrize("family_dir", ["gemma3"], indirect=True)
def test_gemma3_prompts_past_the_sliding_window_attend_within_it(family_dir, reference):
    _, path = family_dir
    prompts, _ = reference
    assert max(LENGTHS) + MAX_NEW > 5 * GEMMA_WINDOW
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=16,
                                    max_model_len=1024))
    assert [engine.model_config.layer_window(i) for i in range(4)] == [GEMMA_WINDOW, GEMMA_WINDOW, None, GEMMA_WINDOW]
    # Without the window, the same weights give other tokens: the window is really applied.
    for layer in engine.runner.model.layers:
        layer.window, layer.fused = None, None  # (the fused C++ layer holds its own window)
    assert run_staggered(engine, [prompts[-1]], PARAMS, [0])["p0"] != reference[1][-1]


@pytest.mark.parametrize("family_dir", ["gemma3"], indirect=True)
def test_gemma3_on_the_triton_backend_gives_transformers_tokens(family_dir, reference):
    """The Triton kernels' sliding window inside the engine (the interpreter on CPU)."""
    _, path = family_dir
    prompts, expected = reference
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", num_kv_blocks=64, block_size=16,
                                    max_model_len=1024, max_num_batched_tokens=32, attention_backend="triton"))
    picked = [2, 5, 7]  # 15, 33 and 70 tokens: inside, twice and six times the window
    got = run_staggered(engine, [prompts[i] for i in picked], PARAMS, [0, 0, 2])
    assert [got[f"p{j}"] for j in range(3)] == [expected[i] for i in picked]


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_bf16_prompt_chunks_through_the_cpu_prefill_kernel_equal_the_torch_path_in_any_chunking(tmp_path, family,
                                                                                               monkeypatch):
    """head_dim 64 in bf16: prompt chunks go through the C++ prefill kernel (AVX512-BF16).
    Every chunk's attention equals the torch path's on the same cache and metadata (rows,
    positions, block table, Gemma's window), and whatever the chunking (the whole prompt, 32
    or 16 tokens a step) and after prefix-cache hits, the tokens are the same: each query row
    attends to the same rows in the same order."""
    from engine.attention import torch_prefills
    from engine.attention_backends import CpuBackend
    from engine.platform import current_platform
    from engine_kernels import cpu
    platform = current_platform("cpu")  # the level this machine runs, ENGINE_CPU_ISA's cap included
    kernels = cpu.load(platform.isa)
    if kernels is None or not kernels.prefill_attention_supported(torch.bfloat16, 64):
        pytest.skip(f"no AVX512-BF16 at the {platform.isa} level: bf16 prompts run on torch's SDPA, if at all")
    checked = []
    attend = CpuBackend.attend

    def attend_and_check(self, q, k_cache, v_cache, meta, scale, window=None):
        out = attend(self, q, k_cache, v_cache, meta, scale, window)
        if meta.prefills:
            ref = torch.empty(q.shape)
            torch_prefills(ref, q.float(), k_cache.float(), v_cache.float(), meta, scale, window)
            rows = torch.cat([torch.arange(p.start, p.start + p.num_tokens) for p in meta.prefills])
            torch.testing.assert_close(out[rows].float(), ref[rows], atol=2e-2, rtol=2e-2)
            checked.append(window)
        return out

    monkeypatch.setattr(CpuBackend, "attend", attend_and_check)
    path = save_tiny(family, tmp_path / family, head_dim=64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (70, 17, 45)]
    runs = []
    for chunk in (512, 32, 16):
        engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", num_kv_blocks=64, max_model_len=512,
                                        max_num_batched_tokens=chunk))
        assert engine.stats()["platform"]["kernels"]["prefill_attention"] == "avx512_bf16_lanes"
        first = greedy_tokens(engine, prompts, 12)
        again = greedy_tokens(engine, [p + [7, 8, 9] + t for p, t in zip(prompts, first)], 12)
        assert engine.stats()["prefix_cache_hits"] > 0
        runs.append((first, again))
    assert runs[0] == runs[1] == runs[2]
    assert sum(len(set(t)) for t in runs[0][0]) >= 18  # not degenerate
    assert set(checked) == ({None, GEMMA_WINDOW} if family == "gemma3" else {None})


def test_sharded_checkpoint_loads_and_its_generation_config_sets_the_defaults(tmp_path):
    path = save_tiny("qwen3", tmp_path / "sharded", max_shard_size="100KB",
                     generation={"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                 "bos_token_id": 1, "eos_token_id": [2, 7]})
    assert len(list(path.glob("*.safetensors"))) > 1
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=1024)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 20)
    assert llm.engine.model_config.eos_token_ids == (2, 7)
    req = llm.engine.add_request([5, 6, 7])  # no params: the checkpoint's defaults
    assert (req.sampling_params.temperature, req.sampling_params.top_k) == (0.6, 20)
    llm.engine.abort(req.request_id)
    # Explicit params win; the sharded weights are the same weights.
    family_path = save_tiny("qwen3", tmp_path / "whole")
    prompts = [[3, 4, 5], list(range(10, 40)), list(range(100, 117))]
    whole = LLM(model=str(family_path), dtype="float32", num_kv_blocks=64, max_model_len=1024)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)] == \
        [o.outputs[0].token_ids for o in whole.generate(prompts, PARAMS)]


@pytest.mark.parametrize("family", ["qwen3"])
def test_a_gguf_file_of_the_family_loads_and_gives_its_checkpoints_transformers_tokens(tmp_path, family,
                                                                                      monkeypatch):
    """LLM(model="x.gguf"): converted once through transformers, then served; its tokens are
    transformers' own on the checkpoint the file was written from (F32: lossless). (Gemma 3's:
    the published checkpoint, in tests/engine/test_real_gemma3.py.)"""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    # transformers reads no head size from a Qwen3 GGUF: it takes Qwen3's own, 128.
    hf_dir = save_tiny(family, tmp_path / "hf", vocab_size=49152, **({"head_dim": 128} if family == "qwen3" else {}))
    path = write_gguf(family, hf_dir, tmp_path / f"tiny-{family}.gguf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    llm = LLM(model=str(path), dtype="float32", num_kv_blocks=64, max_model_len=1024)
    assert llm.engine.model_config.architecture == ("gemma3" if family == "gemma3" else "llama")
    prompts = [list(range(100, 140)), [7, 8, 9]]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    assert got == [hf_greedy(hf, p, MAX_NEW, None) for p in prompts]
    assert llm.tokenizer is not None  # converted from the file with the weights


@pytest.mark.parametrize("family,field,value,named", [
    ("gemma3", "attn_logit_softcapping", 50.0, "attention logit soft-capping"),
    ("qwen3", "use_sliding_window", True, "sliding-window attention"),
    ("llama3", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
     "unsupported rope scaling type 'yarn'"),
    ("qwen3", "num_experts", 8, "mixture-of-experts"),
])
def test_a_checkpoint_that_would_be_served_wrong_is_refused_at_load_by_name(tmp_path, family, field, value, named):
    import json
    path = save_tiny(family, tmp_path / family)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None) if field == "rope_scaling" else None
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        LLM(model=str(path), dtype="float32", num_kv_blocks=16, max_model_len=256)
