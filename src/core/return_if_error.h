// M3_RETURN_IF_ERROR(expr): returns the Status of `expr` from the enclosing function unless it
// is ok. One definition for every internal source (core, lanes, tools).
#pragma once

#include "mamba3/mamba3.h"

#define M3_RETURN_IF_ERROR(expr)  \
  do {                            \
    ::mamba3::Status _s = (expr); \
    if (!_s.ok()) return _s;      \
  } while (0)
