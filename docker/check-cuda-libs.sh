#!/bin/sh
# Fail the GPU image build, not the first request on a GPU box, when the
# onnxruntime-gpu wheel pip chose needs CUDA/cuDNN libraries the base image
# does not have (its CUDA major follows the onnxruntime release: 1.31 from
# PyPI links libcudart.so.13). libcuda.so.1 comes from the host's driver at
# run time, so it is not looked for here.
set -eu
capi="$(python3 -c 'import os, onnxruntime; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
lib="$capi/libonnxruntime_providers_cuda.so"
[ -f "$lib" ] || { echo "check-cuda-libs: $lib not found: is this onnxruntime-gpu?" >&2; exit 1; }
missing="$(ldd "$lib" | grep 'not found' | grep -v 'libcuda\.so' || true)"
# cuDNN is opened at run time (dlopen), so ldd cannot see it: ask the loader.
ldconfig -p | grep -q 'libcudnn\.so\.9' || missing="$(printf '%s\n\t%s' "$missing" 'libcudnn.so.9 => not found')"
if [ -n "$missing" ]; then
    echo "check-cuda-libs: onnxruntime-gpu needs libraries the base image lacks; pick a" >&2
    echo "GPU_BASE with the matching CUDA major and cuDNN 9:" >&2
    echo "$missing" >&2
    exit 1
fi
echo "check-cuda-libs: $(basename "$lib") finds all its CUDA libraries"
