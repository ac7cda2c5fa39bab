// Baseline for BENCHMARKS.md: llama.cpp's speed on the same device as `pregate bench`,
// measured like it (a 128-token prompt, then 64 greedy tokens, 2 repetitions), through
// the prebuilt llama.cpp that the npm package node-llama-cpp ships (no compiler needed).
//
//   npm install node-llama-cpp@3.22.1 --ignore-scripts   (in an empty folder)
//   GGML_VK_VISIBLE_DEVICES=0 node llama_cpp.mjs MODEL.gguf            # Vulkan device 0
//   GPU=cpu node llama_cpp.mjs MODEL.gguf                              # llama.cpp's CPU backend
//
// GGML_VK_VISIBLE_DEVICES is needed on a CPU-only box: llama.cpp's Vulkan backend skips
// CPU-type devices such as lavapipe unless they are named. FLASH_ATTN=0 turns flash
// attention off. Prints one JSON line per repetition.
import {getLlama} from "node-llama-cpp";

const modelPath = process.argv[2];
if (!modelPath) {
    console.error("usage: node llama_cpp.mjs MODEL.gguf");
    process.exit(2);
}
const gpu = process.env.GPU === "cpu" ? false : "vulkan";
const llama = await getLlama({gpu, build: "never", logLevel: "warn"});
console.error("backend:", llama.gpu, "devices:", await llama.getGpuDeviceNames());
const model = await llama.loadModel({modelPath, gpuLayers: gpu ? "max" : 0});
const context = await model.createContext({
    contextSize: 512,
    batchSize: 512,
    threads: 2,
    flashAttention: process.env.FLASH_ATTN !== "0",
});
const sequence = context.getSequence();
const text = "fn main() { let mut v = Vec::new(); for i in 0..100 { v.push(i * i); } }\n";
const prompt = model.tokenize(text.repeat(20)).slice(0, 128);
const gen = 64;
for (let rep = 0; rep < 2; rep++) {
    await sequence.clearHistory();
    const t0 = performance.now();
    let firstToken = 0;
    let n = 0;
    // The first token out marks the end of prefill; the next `gen` are decode steps.
    for await (const _ of sequence.evaluate(prompt, {temperature: 0})) {
        if (n === 0) firstToken = performance.now();
        if (++n > gen) break;
    }
    const t1 = performance.now();
    console.log(JSON.stringify({
        rep,
        prompt_tokens: prompt.length,
        prefill_tok_s: prompt.length / ((firstToken - t0) / 1000),
        // n - 1 tokens came after the first: fewer than `gen` if the model stopped early.
        decode_tok_s: (n - 1) / ((t1 - firstToken) / 1000),
    }));
}
