// Uses the installed library: a malformed call must come back as an error status.
#include <mamba3/mamba3.h>

#include <cstdio>
#include <cstring>

int main() {
  mamba3::ForwardArgs args;  // every required tensor absent
  const mamba3::Status st = mamba3::validate(args);
  std::printf("mamba3 %s: validate(empty ForwardArgs) -> %s\n", mamba3::version(),
              st.ToString().c_str());
  if (st.ok() || std::strlen(mamba3::version()) == 0) return 1;
  return 0;
}
