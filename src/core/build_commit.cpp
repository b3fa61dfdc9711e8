// Its own translation unit: only this file recompiles when the commit changes.
#include "core/build_commit.h"

#include "mamba3_build_commit.h"  // generated into the build tree

namespace mamba3 {

const char* build_commit() { return MAMBA3_BUILD_COMMIT; }

}  // namespace mamba3
