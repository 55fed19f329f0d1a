// The dtypes the CPU kernels compute on: float32 and bf16 (float32 math for both).
#pragma once

#include <ATen/Dispatch.h>

#define DISPATCH_FLOAT_BF16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
