#!/usr/bin/env bash
# Issue 5's decode target on a lent GPU: decode at a 25% expert budget, LRU without
# prefetch against lookahead + prefetch under the pre-gate, on the carved default model.
#
# A lent GPU machine has no network and takes at most 64 MiB from this tree, so the model
# travels as a skeleton (examples/model_skeleton.rs: the real layout and dtypes, data
# tiled; timing only) and the decode steps are a real text's tokens (`bench --text`), so
# the experts each step asks for are those of real text, not of the skeleton's output.
#
#   bench/device_offload.sh kit CARVED.gguf ROUTER.safetensors TEXT   # on the dev box
#   then, with the device tool: command `bash bench/device_offload.sh run`,
#   carry ["target/kit"]; the JSON lines come back under $OUT.
#
# PROMPT, GEN and REPS override the token counts (a smoke test on lavapipe: PROMPT=16
# GEN=8 REPS=1 BUDGETS=25%).
set -euo pipefail
KIT=target/kit

case "${1:-}" in
kit)
    model=${2:?carved model}; router=${3:?router}; text=${4:?text}
    cargo build --release --bin pregate --example model_skeleton
    rm -rf "$KIT" && mkdir -p "$KIT"
    cp target/release/pregate target/release/examples/model_skeleton "$KIT/"
    strip "$KIT/pregate" "$KIT/model_skeleton"
    # Compressed: the carry limit is 64 MiB (the router's embeddings shrink 6x).
    "$KIT/model_skeleton" shrink "$model" "$KIT/model.skel.gguf"
    gzip "$KIT/model.skel.gguf"
    gzip -c "$router" > "$KIT/model.router.safetensors.gz"
    cp "$text" "$KIT/text.txt"
    du -sh "$KIT"
    ;;
run)
    out=${OUT:-/tmp/pregate-out}
    mkdir -p "$out"
    work=$(mktemp -d)
    gunzip -c "$KIT/model.skel.gguf.gz" > "$work/model.skel.gguf"
    "$KIT/model_skeleton" expand "$work/model.skel.gguf" "$work/model.gguf"
    # The runtime finds the router next to the model.
    gunzip -c "$KIT/model.router.safetensors.gz" > "$work/model.router.safetensors"
    "$KIT/pregate" devices | tee "$out/devices.txt"
    bench() {
        local name=$1; shift
        echo "== $name: $*"
        "$KIT/pregate" bench -m "$work/model.gguf" --text "$KIT/text.txt" \
            --prompt-tokens "${PROMPT:-128}" --gen-tokens "${GEN:-256}" --reps "${REPS:-2}" \
            --vram-budget "${BUDGETS:-25%,50%,all}" --json "$@" | tee "$out/$name.json"
    }
    bench layer-lru --policy lru
    bench layer-lfu --policy lfu
    bench layer-next-layer --policy lru --prefetch next-layer
    bench layer-lookahead-prefetch --policy lookahead --prefetch pregate
    bench pregate-lru --routing pregate --policy lru
    bench pregate-lookahead-prefetch --routing pregate --policy lookahead --prefetch pregate
    rm -rf "$work"
    ;;
*)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
