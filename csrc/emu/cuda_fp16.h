#pragma once
#include "emu.h"

struct __half { uint16_t bits; };
struct __half2 { __half x, y; };

inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return (float)h;
}
inline __half __float2half_rn(float f) {
  const _Float16 h = (_Float16)f;
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
