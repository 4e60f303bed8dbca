#!/usr/bin/env python3
"""Run llama.cpp (llama_logits, built from llama_logits.cpp against libllama) on every
*.gguf in this directory and write <stem>.json with per-position top-5 log-probs.

usage: python3 make_ref.py /path/to/llama_logits [LLAMA_CPP_VERSION_STRING]
Each model is run twice; the script fails if the two runs' logits differ.
logprob = log_softmax(full logits) computed in float64 from llama.cpp's f32 logits.
"""
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_SPECIAL_FIRST = 297   # ids >= 297 are the control tokens (see make_tiny.py)
PROMPT_IDS = [int(x) for x in np.random.default_rng(20240607).integers(0, N_SPECIAL_FIRST, 24)]
TOPK = 5


def run(binary, model):
    cmd = ["nice", "-n", "19", binary, model, ",".join(map(str, PROMPT_IDS))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.strip().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(len(PROMPT_IDS)))
    return out, np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float64)


def main():
    binary = os.path.abspath(sys.argv[1])
    version = sys.argv[2] if len(sys.argv) > 2 else "unknown"
    for model in sorted(glob.glob(os.path.join(HERE, "*.gguf"))):
        out1, logits = run(binary, model)
        out2, _ = run(binary, model)
        if out1 != out2:
            sys.exit(f"non-deterministic output for {model}")
        assert np.all(np.isfinite(logits))
        m = logits.max(axis=1, keepdims=True)
        logp = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
        positions = []
        for row in logp:
            top = np.argsort(-row, kind="stable")[:TOPK]
            positions.append({"top": [[int(i), round(float(row[i]), 6)] for i in top]})
        name = os.path.basename(model)
        with open(model, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        ref = {
            "model_file": name,
            "sha256": sha,
            "made_with": {
                "llama_cpp": version,
                "command": f"llama_logits {name} <prompt_ids joined by ','>  "
                           "(llama_logits.cpp: 1 thread, n_ctx=n_batch=n_ubatch=256, one llama_decode "
                           "with logits for all positions, no BOS added, flash_attn off, F32 KV cache, CPU)",
                "logprob": "log_softmax over all logits, float64",
                "deterministic": "two runs gave identical logits",
            },
            "prompt_ids": PROMPT_IDS,
            "positions": positions,
        }
        stem = os.path.splitext(name)[0]
        with open(os.path.join(HERE, stem + ".json"), "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        print(stem, "top1:", [p["top"][0][0] for p in positions][:8], "...",
              "max logprob range:", round(float(logp.max(axis=1).min()), 3), round(float(logp.max(axis=1).max()), 3))


if __name__ == "__main__":
    main()
