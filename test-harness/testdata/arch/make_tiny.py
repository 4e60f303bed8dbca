#!/usr/bin/env python3
"""Write tiny random-weight GGUF models (llama, qwen2, qwen3, phi3, gemma3).

Deterministic: numpy default_rng with a fixed per-arch seed; the same gguf-py
version writes byte-identical files.  Needs `pip install gguf numpy`
(gguf = llama.cpp's gguf-py; these files were written with gguf 0.19.0).

Tensor names and metadata keys follow llama.cpp's convert_hf_to_gguf.py
(conversion/{llama,qwen,phi,gemma}.py + conversion/base.py) and
src/models/<arch>.cpp.  Numpy shapes are (rows=out, cols=in), i.e. ggml
ne = [in, out]; y = W @ x.

Usage: python3 make_tiny.py [outdir]   (default: the directory of this script)
Writes <arch>-tiny-f32.gguf and <arch>-tiny-q8_0.gguf for each arch.
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

N_EMBD = 64
N_FF = 128
N_CTX = 256

# ---------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    """GPT-2's byte -> printable unicode char table (same as tiktoken/HF)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


MERGES = [
    ("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"),
    ("Ġt", "he"), ("e", "r"), ("Ġ", "s"), ("a", "t"), ("Ġ", "w"), ("Ġ", "o"),
    ("e", "n"), ("Ġ", "c"), ("i", "t"), ("i", "s"), ("a", "n"), ("o", "r"),
    ("e", "s"), ("Ġ", "b"), ("e", "d"), ("Ġ", "f"), ("in", "g"), ("Ġ", "p"),
    ("o", "u"), ("Ġa", "n"), ("a", "l"), ("a", "r"), ("Ġt", "o"), ("Ġ", "m"),
    ("Ġo", "f"), ("Ġ", "in"), ("Ġ", "d"), ("Ġ", "h"), ("Ġan", "d"), ("i", "c"),
    ("a", "s"), ("l", "e"), ("o", "m"), ("l", "l"), ("Ġ", "re"),
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_vocab():
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]  # id == byte value
    for a, b in MERGES:
        assert a in tokens and b in tokens, (a, b)
        assert a + b not in tokens, a + b
        tokens.append(a + b)
    n_normal = len(tokens)
    tokens += SPECIALS
    types = [int(gguf.TokenType.NORMAL)] * n_normal + [int(gguf.TokenType.CONTROL)] * len(SPECIALS)
    merges = [f"{a} {b}" for a, b in MERGES]
    return tokens, types, merges, n_normal


TOKENS, TOKEN_TYPES, MERGE_STRS, N_NORMAL = make_vocab()
N_VOCAB = len(TOKENS)          # 300
EOT_ID = TOKENS.index("<|endoftext|>")


def add_tokenizer(w, pre):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGE_STRS)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_add_bos_token(False)


# ---------------------------------------------------------------- weights
class Gen:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def w(self, out, inp, std=0.1):
        return (self.rng.standard_normal((out, inp)) * std).astype(np.float32)

    def norm(self, n):
        return (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def bias(self, n, std=0.1):
        return (self.rng.standard_normal(n) * std).astype(np.float32)


def build(arch):
    """Return (metadata list of (method, args), ordered list of (name, ndarray))."""
    g = Gen({"llama": 1, "qwen2": 2, "qwen3": 3, "phi3": 4, "gemma3": 5}[arch])
    T = []
    md = []

    def common(n_layer, n_head, n_head_kv, eps, rope_base):
        md.extend([
            ("add_context_length", N_CTX),
            ("add_embedding_length", N_EMBD),
            ("add_block_count", n_layer),
            ("add_feed_forward_length", N_FF),
            ("add_head_count", n_head),
            ("add_head_count_kv", n_head_kv),
            ("add_layer_norm_rms_eps", eps),
            ("add_rope_freq_base", rope_base),
        ])

    if arch == "llama":
        # conversion/llama.py: + vocab_size, rope.dimension_count; untied output
        n_layer, n_head, n_kv, hd = 2, 4, 2, 16
        common(n_layer, n_head, n_kv, 1e-5, 10000.0)
        md += [("add_vocab_size", N_VOCAB), ("add_rope_dimension_count", hd)]
        T.append(("token_embd.weight", g.w(N_VOCAB, N_EMBD, 0.3)))
        for i in range(n_layer):
            p = f"blk.{i}."
            T += [(p + "attn_norm.weight", g.norm(N_EMBD)),
                  (p + "attn_q.weight", g.w(n_head * hd, N_EMBD)),
                  (p + "attn_k.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_v.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_output.weight", g.w(N_EMBD, n_head * hd)),
                  (p + "ffn_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_gate.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_up.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_down.weight", g.w(N_EMBD, N_FF))]
        T += [("output_norm.weight", g.norm(N_EMBD)),
              ("output.weight", g.w(N_VOCAB, N_EMBD, 0.3))]
        pre = "default"
    elif arch == "qwen2":
        # Q/K/V biases, tied embeddings (no output.weight)
        n_layer, n_head, n_kv, hd = 2, 4, 2, 16
        common(n_layer, n_head, n_kv, 1e-6, 1000000.0)
        T.append(("token_embd.weight", g.w(N_VOCAB, N_EMBD, 0.3)))
        for i in range(n_layer):
            p = f"blk.{i}."
            T += [(p + "attn_norm.weight", g.norm(N_EMBD)),
                  (p + "attn_q.weight", g.w(n_head * hd, N_EMBD)),
                  (p + "attn_q.bias", g.bias(n_head * hd)),
                  (p + "attn_k.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_k.bias", g.bias(n_kv * hd)),
                  (p + "attn_v.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_v.bias", g.bias(n_kv * hd)),
                  (p + "attn_output.weight", g.w(N_EMBD, n_head * hd)),
                  (p + "ffn_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_gate.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_up.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_down.weight", g.w(N_EMBD, N_FF))]
        T.append(("output_norm.weight", g.norm(N_EMBD)))
        pre = "qwen2"
    elif arch == "qwen3":
        # head_dim (key/value_length) 32 != 64/4; per-head q/k RMS norms; untied
        n_layer, n_head, n_kv, hd = 2, 4, 2, 32
        common(n_layer, n_head, n_kv, 1e-6, 1000000.0)
        md += [("add_key_length", hd), ("add_value_length", hd)]
        T.append(("token_embd.weight", g.w(N_VOCAB, N_EMBD, 0.3)))
        for i in range(n_layer):
            p = f"blk.{i}."
            T += [(p + "attn_norm.weight", g.norm(N_EMBD)),
                  (p + "attn_q.weight", g.w(n_head * hd, N_EMBD)),
                  (p + "attn_q_norm.weight", g.norm(hd)),
                  (p + "attn_k.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_k_norm.weight", g.norm(hd)),
                  (p + "attn_v.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_output.weight", g.w(N_EMBD, n_head * hd)),
                  (p + "ffn_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_gate.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_up.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_down.weight", g.w(N_EMBD, N_FF))]
        T += [("output_norm.weight", g.norm(N_EMBD)),
              ("output.weight", g.w(N_VOCAB, N_EMBD, 0.3))]
        pre = "qwen2"
    elif arch == "phi3":
        # conversion/phi.py Phi3MiniModel: fused attn_qkv (Q rows, then K, then V),
        # fused ffn_up = [gate; up] (2*n_ff rows, gate first), rope.dimension_count,
        # rope.scaling.original_context_length, attention.sliding_window
        # (2047 as in Phi-3-mini; llama.cpp ignores phi3 SWA, and 2047 > n_ctx anyway).
        n_layer, n_head, n_kv, hd = 2, 4, 2, 16
        common(n_layer, n_head, n_kv, 1e-5, 10000.0)
        md += [("add_rope_scaling_orig_ctx_len", N_CTX), ("add_rope_dimension_count", hd),
               ("add_sliding_window", 2047)]
        T.append(("token_embd.weight", g.w(N_VOCAB, N_EMBD, 0.3)))
        for i in range(n_layer):
            p = f"blk.{i}."
            q, k, v = g.w(n_head * hd, N_EMBD), g.w(n_kv * hd, N_EMBD), g.w(n_kv * hd, N_EMBD)
            gate, up = g.w(N_FF, N_EMBD), g.w(N_FF, N_EMBD)
            T += [(p + "attn_norm.weight", g.norm(N_EMBD)),
                  (p + "attn_qkv.weight", np.concatenate([q, k, v], axis=0)),
                  (p + "attn_output.weight", g.w(N_EMBD, n_head * hd)),
                  (p + "ffn_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_up.weight", np.concatenate([gate, up], axis=0)),
                  (p + "ffn_down.weight", g.w(N_EMBD, N_FF))]
        T += [("output_norm.weight", g.norm(N_EMBD)),
              ("output.weight", g.w(N_VOCAB, N_EMBD, 0.3))]
        pre = "default"
    elif arch == "gemma3":
        # conversion/gemma.py Gemma3Model: key/value_length = head_dim (32 != 64/4),
        # rope.freq_base (global) + rope.freq_base_swa (local), attention.sliding_window;
        # no sliding_window_pattern key -> llama.cpp default pattern 6 (5 local, 1 global).
        # Norm weights are stored as (1 + w_hf), i.e. used directly by llama.cpp. Tied.
        n_layer, n_head, n_kv, hd = 6, 4, 1, 32
        common(n_layer, n_head, n_kv, 1e-6, 1000000.0)
        md += [("add_key_length", hd), ("add_value_length", hd),
               ("add_rope_freq_base_swa", 10000.0), ("add_sliding_window", 8)]
        T.append(("token_embd.weight", g.w(N_VOCAB, N_EMBD, 0.25)))
        for i in range(n_layer):
            p = f"blk.{i}."
            T += [(p + "attn_norm.weight", g.norm(N_EMBD)),
                  (p + "attn_q.weight", g.w(n_head * hd, N_EMBD)),
                  (p + "attn_q_norm.weight", g.norm(hd)),
                  (p + "attn_k.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_k_norm.weight", g.norm(hd)),
                  (p + "attn_v.weight", g.w(n_kv * hd, N_EMBD)),
                  (p + "attn_output.weight", g.w(N_EMBD, n_head * hd)),
                  (p + "post_attention_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_norm.weight", g.norm(N_EMBD)),
                  (p + "ffn_gate.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_up.weight", g.w(N_FF, N_EMBD)),
                  (p + "ffn_down.weight", g.w(N_EMBD, N_FF)),
                  (p + "post_ffw_norm.weight", g.norm(N_EMBD))]
        T.append(("output_norm.weight", g.norm(N_EMBD)))
        pre = "default"
    else:
        raise ValueError(arch)
    return md, T, pre


def write(arch, outdir, qtype):
    md, T, pre = build(arch)
    suffix = "f32" if qtype is None else "q8_0"
    path = os.path.join(outdir, f"{arch}-tiny-{suffix}.gguf")
    w = gguf.GGUFWriter(path, arch)
    # note: a general.name containing "phi3"/"phi-3" makes llama.cpp's vocab loader look up
    # "</s>" (llama-vocab.cpp, model_name phi3 branch), which this tiny BPE vocab lacks.
    w.add_name("tiny-random")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType.MOSTLY_Q8_0)
    for meth, val in md:
        getattr(w, meth)(val)
    add_tokenizer(w, pre)
    for name, arr in T:
        if qtype is None or arr.ndim == 1:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3"]


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for arch in ARCHS:
        for qt in (None, QT.Q8_0):
            p = write(arch, outdir, qt)
            print(p, os.path.getsize(p))


if __name__ == "__main__":
    main()
