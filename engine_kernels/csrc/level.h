// Every kernel of one ISA level, and its table. Included once per level, inside that
// level's namespace, by level_<isa>.cpp (which sets the target and the ENGINE_<LEVEL>
// macro): the same sources compiled for each level, picked at run time.
using engine::DType;
using engine::KernelTable;

#include "vec.h"
#include "elementwise.h"
#include "attention.h"
#include "prefill_attention.h"
#include "kv_int8.h"
#include "quant.h"
#include "gemv_bf16.h"
#include "sampling.h"

#if ENGINE_AVX512
#define ENGINE_LEVEL_NAME "avx512"
#elif ENGINE_AVX2
#define ENGINE_LEVEL_NAME "avx2"
#else
#define ENGINE_LEVEL_NAME "generic"
#endif

const KernelTable table = {
    ENGINE_LEVEL_NAME, kQuantName, has_bf16,
    rms_norm, fused_add_rms_norm, head_rms_norm, rope_write_kv, act_and_mul,
    decode_attention, decode_attention_name,
    rope_write_kv_int8, decode_attention_int8, dequantize_kv_blocks,
    quant_linear,
#if ENGINE_AVX512 && ENGINE_BF16
    gemv_bf16, prefill_attention,
#else
    nullptr, nullptr,
#endif
    argmax_rows, apply_token_bitmask,
};
#undef ENGINE_LEVEL_NAME
