#!/bin/sh
# CUDA compiler launcher (CMAKE_CUDA_COMPILER_LAUNCHER): runs the compile command given as
# arguments unchanged and keeps its diagnostics, which include ptxas's -v resource report, in
# <object>.ptxas.txt next to the object, so tools/check_spills.py sees every kernel of a build,
# incremental builds included. The diagnostics still go to stderr as usual.
obj=
prev=
for a in "$@"; do
  [ "$prev" = "-o" ] && obj=$a
  prev=$a
done
if [ -z "$obj" ]; then
  exec "$@"
fi
"$@" 2>"$obj.ptxas.txt"
rc=$?
cat "$obj.ptxas.txt" >&2
exit $rc
