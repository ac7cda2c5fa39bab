#!/usr/bin/env bash
# pregate against llama.cpp's Vulkan backend on one GPU, same GGUF, same run: prefill of
# 512 tokens (pp512) and 128 decode steps (tg128) at depth 0 and 2048.
#
# A lent GPU machine has no network and takes at most 64 MiB from this tree, so the kit
# carries stripped binaries, the Vulkan loader, and each model as a skeleton
# (examples/model_skeleton.rs: the real layout and dtypes, data tiled; timing only).
#
#   bench/device_speed.sh llama                  # build llama-bench (Vulkan) from source
#   bench/device_speed.sh kit MODEL.gguf...      # on the dev box: target/kit-speed
#   then, with the device tool: command `bash bench/device_speed.sh run`,
#   carry ["target/kit-speed"]; the table and the raw JSON come back under $OUT.
#
# `llama` needs cmake, g++, glslc, libvulkan-dev and spirv-headers (Debian), and pip to
# fetch the llama-cpp-python source distribution whose vendor/llama.cpp is built. Debian
# 12's Vulkan headers predate VK_EXT_layer_settings, so that block of ggml-vulkan.cpp is
# taken out. On a box without a GPU, `run` works too (GGML_VK_VISIBLE_DEVICES=0 lets
# llama.cpp use lavapipe): REPS=1 GEN=8 DEPTH=0 PROMPT=64 make it a smoke test.
# The MoE offload comparison (LRU against the pre-gate at a 25% budget) has its own kit:
# bench/device_offload.sh.
set -euo pipefail
KIT=target/kit-speed
LLAMA=target/llama.cpp
LLAMA_PY_VERSION=0.3.36

build_llama() {
    local src=$LLAMA/src
    if [ ! -d "$src" ]; then
        mkdir -p "$LLAMA"
        python3 -m pip download --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_PY_VERSION" -d "$LLAMA"
        tar xzf "$LLAMA/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz" -C "$LLAMA"
        mv "$LLAMA/llama_cpp_python-$LLAMA_PY_VERSION/vendor/llama.cpp" "$src"
    fi
    if ! grep -q VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h; then
        python3 - "$src/ggml/src/ggml-vulkan/ggml-vulkan.cpp" <<'EOF'
import re, sys
path = sys.argv[1]
s = open(path).read()
s = re.sub(r"    VkBool32 enable_best_practice = layer_settings;\n.*?"
           r"vk::LayerSettingsCreateInfoEXT layer_setting_info\(settings\);\n", "", s, flags=re.S)
s = s.replace(", &layer_setting_info);", ");")
open(path, "w").write(s)
EOF
    fi
    cmake -S "$src" -B "$LLAMA/build" -DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$LLAMA/build" --target llama-bench -j "$(nproc)"
}

case "${1:-}" in
llama)
    build_llama
    ;;
kit)
    shift
    [ $# -gt 0 ] || { echo "kit: give one or more GGUF models" >&2; exit 2; }
    [ -x "$LLAMA/build/bin/llama-bench" ] || build_llama
    cargo build --release --bin pregate --example model_skeleton
    rm -rf "$KIT" && mkdir -p "$KIT/models"
    cp target/release/pregate target/release/examples/model_skeleton \
        "$LLAMA/build/bin/llama-bench" bench/speed_table.py "$KIT/"
    strip "$KIT/pregate" "$KIT/model_skeleton" "$KIT/llama-bench"
    # The Vulkan loader, in case the GPU machine lacks it (the driver brings its own ICD).
    cp -L "$(ldconfig -p | awk '/libvulkan.so.1 .*x86-64/ {print $NF; exit}')" "$KIT/libvulkan.so.1"
    for m in "$@"; do
        name=$(basename "$m" .gguf)
        "$KIT/model_skeleton" shrink "$m" "$KIT/models/$name.skel.gguf"
    done
    # xz: llama-bench's embedded shaders and the tokenizer in every skeleton shrink 3-6x,
    # which the 64 MiB carry limit needs for three models.
    xz -9 -T0 "$KIT/pregate" "$KIT/llama-bench" "$KIT"/models/*.skel.gguf
    du -sh "$KIT"
    ;;
run)
    out=${OUT:-/tmp/pregate-out}
    mkdir -p "$out"
    work=$(mktemp -d)
    # python3's lzma: the GPU machine may lack xz.
    unxz_to() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
    unxz_to "$KIT/pregate.xz" "$work/pregate"
    unxz_to "$KIT/llama-bench.xz" "$work/llama-bench"
    chmod +x "$work/pregate" "$work/llama-bench"
    ldconfig -p | grep -q libvulkan.so.1 || export LD_LIBRARY_PATH="$PWD/$KIT${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nv=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    [ -e "$nv" ] && export VK_DRIVER_FILES=${VK_DRIVER_FILES:-$nv}
    "$work/pregate" devices | tee "$out/devices.txt"
    prompt=${PROMPT:-512} gen=${GEN:-128} reps=${REPS:-3} depths=${DEPTH:-0,2048}
    for skel in "$KIT"/models/*.skel.gguf.xz; do
        name=$(basename "$skel" .skel.gguf.xz)
        unxz_to "$skel" "$work/skel.gguf"
        "$KIT/model_skeleton" expand "$work/skel.gguf" "$work/$name.gguf"
        rm "$work/skel.gguf"
        model=$work/$name.gguf
        echo "== $name: llama.cpp"
        "$work/llama-bench" -m "$model" -ngl 99 -fa 1 -p "$prompt" -n "$gen" -d "$depths" \
            -r "$reps" -o json > "$out/$name.llama.json" || echo "llama-bench failed" >&2
        for d in ${depths//,/ }; do
            # pregate bench decodes after its prompt: depth 0 is pp$prompt then decode at
            # depth $prompt; depth d > 0 decodes after a d-token prompt.
            p=$prompt; [ "$d" -gt 0 ] && p=$d
            echo "== $name: pregate, prompt $p"
            "$work/pregate" bench -m "$model" --ctx $((p + gen + 16)) \
                --prompt-tokens "$p" --gen-tokens "$gen" --reps "$reps" --json \
                > "$out/$name.pregate.d$d.json" || echo "pregate bench failed" >&2
        done
        rm "$model"
    done
    python3 "$KIT/speed_table.py" "$out" | tee "$out/table.md"
    rm -rf "$work"
    ;;
*)
    sed -n 2,20p "$0"
    exit 2
    ;;
esac
