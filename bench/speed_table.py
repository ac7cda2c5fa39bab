"""The side-by-side table of bench/device_speed.sh: reads OUT/NAME.llama.json (llama-bench
-o json) and OUT/NAME.pregate.dDEPTH.json (pregate bench --json) and prints a Markdown
table of tokens/s, with pregate's ratio to llama.cpp."""
import json
import pathlib
import sys


def llama_rows(path):
    """(test, depth) -> tokens/s from llama-bench's JSON."""
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    rows = {}
    for r in runs:
        depth = r.get("n_depth", 0)
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        rows[(test, depth)] = r["avg_ts"]
    return rows


def pregate_rows(out, name):
    rows = {}
    for path in sorted(out.glob(f"{name}.pregate.d*.json")):
        depth = int(path.stem.rsplit(".d", 1)[1])
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if depth == 0:
            rows[(f"pp{r['prompt_tokens']}", 0)] = r["prefill_tok_s"]
        rows[(f"tg{r['gen_tokens']}", depth)] = r["decode_tok_s"]
    return rows


def main():
    out = pathlib.Path(sys.argv[1])
    print("| model | test | depth | llama.cpp Vulkan tok/s | pregate tok/s | pregate / llama.cpp |")
    print("|---|---|---:|---:|---:|---:|")
    for lj in sorted(out.glob("*.llama.json")):
        name = lj.name[: -len(".llama.json")]
        ll, pg = llama_rows(lj), pregate_rows(out, name)
        for key in sorted(set(ll) | set(pg), key=lambda k: (k[0][:2] != "pp", k[1], k[0])):
            a, b = ll.get(key), pg.get(key)
            ratio = f"{b / a:.2f}x" if a and b else "-"
            fmt = lambda v: f"{v:.1f}" if v else "-"
            print(f"| {name} | {key[0]} | {key[1]} | {fmt(a)} | {fmt(b)} | {ratio} |")


if __name__ == "__main__":
    main()
