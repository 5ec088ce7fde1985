// The system headers every level's kernels use, included at file scope before a level's
// namespace opens (level_<isa>.cpp); the kernel sources themselves include nothing.
#pragma once
#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include "table.h"
