// The float64 token-by-token recurrence of DESIGN.md §2.2: the definition every lane is tested
// against. Instantiated for T = double (the reference lane) and T = float (a naive float32
// evaluation of the same recurrence, used only to set the tolerance of the fast lanes).
// The functions assume validated arguments (mamba3::validate).
#pragma once

#include "mamba3/mamba3.h"

namespace mamba3::reference {

template <typename T>
Status forward(const ForwardArgs& args);
template <typename T>
Status backward(const BackwardArgs& args);
template <typename T>
Status step(const StepArgs& args);

}  // namespace mamba3::reference
