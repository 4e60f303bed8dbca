#!/usr/bin/env python3
"""Independent float64 numpy forward pass for the tiny GGUF files, written from the facts
read in llama.cpp's source; checks that it reproduces the reference JSON (top-5 log-probs).

usage: python3 numpy_forward.py [file.gguf ...]   (default: all *.gguf here)
Q8_0 weights are dequantized (llama.cpp additionally quantizes activations to Q8_0 in its
Q8_0 matmuls, so Q8_0 files agree less tightly than F32 ones).
"""
import glob
import json
import math
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    r = GGUFReader(path)
    md = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer.") or k.startswith("GGUF."):
            continue
        v = f.parts[f.data[0]] if f.data else None
        if f.types and f.types[0].name == "STRING":
            md[k] = bytes(v).decode()
        elif v is not None:
            md[k] = v.tolist()[0]
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim > 1 or len(t.shape) > 1 else a
    return md, W


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_neox(x, pos, base):
    # x: [T, H, D]; NEOX: rotate pairs (i, i + D/2), theta_i = pos * base^(-2i/D)
    D = x.shape[-1]
    half = D // 2
    inv = base ** (-np.arange(half) * 2.0 / D)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rope_norm(x, pos, base):
    # NORM (GPT-J style): rotate adjacent pairs (2i, 2i+1)
    D = x.shape[-1]
    inv = base ** (-np.arange(D // 2) * 2.0 / D)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


def silu(x):
    return x / (1 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * x * (1 + 0.044715 * x * x)))


def gelu_ggml_cpu(x):
    """ggml-cpu's GELU/GEGLU (GGML_GELU_FP16, ggml-cpu/vec.h): tanh-approx GELU looked up in an
    fp16 table: x -> fp16, gelu in f32, result -> fp16; x <= -10 -> 0, x >= 10 -> x."""
    x32 = x.astype(np.float32)
    h = x32.astype(np.float16).astype(np.float32)
    c = np.float32(math.sqrt(2 / math.pi))
    t = (0.5 * h * (1 + np.tanh(c * h * (1 + np.float32(0.044715) * h * h)))).astype(np.float16)
    return np.where(x32 <= -10, 0.0, np.where(x32 >= 10, x, t.astype(np.float64)))


GELU = gelu_ggml_cpu   # set to gelu_tanh for the exact-math version (~2e-3 logprob off on gemma3)


def forward(md, W, ids):
    arch = md["general.architecture"]
    g = lambda k, d=None: md.get(f"{arch}.{k}", d)
    n_embd, n_layer = g("embedding_length"), g("block_count")
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    hd = g("attention.key_length", n_embd // n_head)
    eps = g("attention.layer_norm_rms_epsilon")
    base = g("rope.freq_base", 10000.0)
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    rope = rope_norm if arch == "llama" else rope_neox
    n_swa = g("attention.sliding_window", 0) if arch == "gemma3" else 0   # phi3 SWA disabled in llama.cpp
    is_swa = [n_swa > 0 and (il % 6 < 5) for il in range(n_layer)]      # set_swa_pattern(6)
    x = W["token_embd.weight"][ids]
    if arch == "gemma3":
        x = x * np.float32(math.sqrt(n_embd))
    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms(x, W[p + "attn_norm.weight"], eps)
        if p + "attn_qkv.weight" in W:
            qkv = h @ W[p + "attn_qkv.weight"].T
            q, k, v = np.split(qkv, [n_head * hd, n_head * hd + n_kv * hd], axis=-1)
        else:
            q, k, v = (h @ W[p + f"attn_{n}.weight"].T for n in "qkv")
            if p + "attn_q.bias" in W:
                q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        q, k, v = q.reshape(T, n_head, hd), k.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd)
        if p + "attn_q_norm.weight" in W:
            q, k = rms(q, W[p + "attn_q_norm.weight"], eps), rms(k, W[p + "attn_k_norm.weight"], eps)
        b = g("rope.freq_base_swa", 10000.0) if is_swa[il] else base
        q, k = rope(q, pos, b), rope(k, pos, b)
        scale = 1.0 / math.sqrt(hd)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * scale
        qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
        mask = ki > qi
        if is_swa[il]:
            mask |= (qi - ki) >= n_swa        # is_masked_swa STANDARD: p1 - p0 >= n_swa
        s = np.where(mask[None], -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", s, v).reshape(T, n_head * hd) @ W[p + "attn_output.weight"].T
        if arch == "gemma3":
            a = rms(a, W[p + "post_attention_norm.weight"], eps)
        x = x + a
        h = rms(x, W[p + "ffn_norm.weight"], eps)
        if arch == "phi3":
            gu = h @ W[p + "ffn_up.weight"].T
            gate, up = np.split(gu, 2, axis=-1)       # gate first, then up
            f = silu(gate) * up
        else:
            gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
            f = (GELU(gate) if arch == "gemma3" else silu(gate)) * up
        f = f @ W[p + "ffn_down.weight"].T
        if arch == "gemma3":
            f = rms(f, W[p + "post_ffw_norm.weight"], eps)
        x = x + f
    x = rms(x, W["output_norm.weight"], eps)
    out = W.get("output.weight", W["token_embd.weight"])
    logits = x @ out.T
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def main():
    files = sys.argv[1:] or sorted(glob.glob(os.path.join(HERE, "*.gguf")))
    for f in files:
        ref = json.load(open(os.path.splitext(f)[0] + ".json"))
        md, W = load(f)
        lp = forward(md, W, ref["prompt_ids"])
        maxdiff, top1_ok = 0.0, 0
        for t, p in enumerate(ref["positions"]):
            for i, l in p["top"]:
                maxdiff = max(maxdiff, abs(lp[t, i] - l))
            top1_ok += int(np.argmax(lp[t]) == p["top"][0][0])
        print(f"{os.path.basename(f):24s} max|dlogprob| over top-5 = {maxdiff:.2e}  top1 agree {top1_ok}/{len(ref['positions'])}")


if __name__ == "__main__":
    main()
