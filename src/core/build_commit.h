// The commit this library was built from (cmake/build_commit.cmake): `git describe --always
// --dirty --abbrev=12` of the source tree at build time, or "unknown" outside a git checkout.
// Reported by build_options() ("commit=") and recorded by `mamba3 bench`, so that a timing or a
// binary carried to another machine says which source it came from.
#pragma once

namespace mamba3 {

const char* build_commit();

}  // namespace mamba3
