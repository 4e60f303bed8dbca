//! Text ⇄ token ids for the loaded model.
//!
//! The vocabulary comes from the GGUF metadata (`tokenizer.ggml.*`) or from a `tokenizer.json`
//! beside the model file. For GGUF we build a byte-level BPE with the pre-tokenizer the metadata
//! names (`tokenizer.ggml.pre`): SmolLM2's "smollm" splits every digit on its own before the
//! GPT-2 split and adds no prefix space, which is what llama.cpp does and what candle's own GGUF
//! helper gets wrong. Decoding is ours: each id maps to its raw bytes once at load, so the
//! streaming detokenizer can work on bytes.

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::json;

use crate::EngineError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;
const TOKEN_TYPE_BYTE: u32 = 6;

/// Names that end generation in the chat formats we know, when the vocabulary marks them as
/// special (llama.cpp's end-of-generation set does the same).
const END_OF_GENERATION_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw bytes of each id; empty for control tokens, which are never rendered.
    bytes: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_generation: HashSet<u32>,
    bos_text: String,
    eos_text: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.bytes.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn meta<'a>(content: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    content.metadata.get(key)
}

fn meta_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    meta(content, key).and_then(|v| v.to_u32().ok())
}

fn tok_err(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

impl Tokenizer {
    /// Prefers a `tokenizer.json` beside the model (when present), else the GGUF metadata.
    pub fn load(model_path: &Path, content: &gguf_file::Content) -> Result<Self, EngineError> {
        let beside = model_path.with_file_name("tokenizer.json");
        if beside.is_file() {
            tracing::info!(path = %beside.display(), "tokenizer from tokenizer.json");
            return Self::from_tokenizer_json(&beside, content);
        }
        Self::from_gguf(content)
    }

    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, EngineError> {
        let model = meta(content, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let spm = match model.as_str() {
            "gpt2" => false,
            "llama" => true,
            _ => {
                return Err(tok_err(format!(
                    "tokenizer.ggml.model `{model}` is not supported from GGUF metadata (byte-level BPE `gpt2` and SentencePiece `llama` are); put a tokenizer.json beside the model"
                )));
            }
        };
        let tokens: Vec<String> = meta(content, "tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| tok_err("tokenizer.ggml.tokens missing"))?
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect();
        let types: Vec<u32> = meta(content, "tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|vs| {
                vs.iter()
                    .map(|v| v.to_i32().map(|x| x as u32).or_else(|_| v.to_u32()))
                    .map(|r| r.unwrap_or(1))
                    .collect()
            })
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let pre = meta(content, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".to_owned());
        let merges: serde_json::Value = if spm {
            let scores: Vec<f32> = meta(content, "tokenizer.ggml.scores")
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| tok_err("tokenizer.ggml.scores missing"))?
                .iter()
                .map(|v| v.to_f32().unwrap_or(0.0))
                .collect();
            spm_merges(&tokens, &scores, &types).into()
        } else {
            match meta(content, "tokenizer.ggml.merges") {
                Some(v) => v
                    .to_vec()
                    .map_err(|e| tok_err(format!("tokenizer.ggml.merges: {e}")))?
                    .iter()
                    .map(|v| v.to_string().cloned().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .into(),
                None => return Err(tok_err("tokenizer.ggml.merges missing")),
            }
        };
        // SentencePiece: spaces are `▁`, optionally one in front of the text, no split into
        // words; characters missing from the vocabulary fall back to `<0xAB>` byte tokens.
        let add_space_prefix = meta(content, "tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        let replace_spaces =
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let (normalizer, pre_tokenizer) = match (spm, add_space_prefix) {
            (true, true) => (
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"}, replace_spaces]}),
                serde_json::Value::Null,
            ),
            (true, false) => (replace_spaces, serde_json::Value::Null),
            (false, _) => (serde_json::Value::Null, pre_tokenizer_for(&pre)),
        };

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": spm, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| tok_err(format!("building BPE from GGUF: {e}")))?;

        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| match types.get(id).copied().unwrap_or(1) {
                TOKEN_TYPE_CONTROL => Vec::new(),
                TOKEN_TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                TOKEN_TYPE_BYTE => sentencepiece_decode(t),
                _ if spm => sentencepiece_decode(t),
                _ => byte_level_decode(t),
            })
            .collect();
        let SpecialIds {
            bos,
            eos,
            add_bos,
            mut end_of_generation,
        } = special_ids(content);
        for (id, tok) in tokens.iter().enumerate() {
            if types.get(id).copied() == Some(TOKEN_TYPE_CONTROL)
                && END_OF_GENERATION_NAMES.contains(&tok.as_str())
            {
                end_of_generation.insert(id as u32);
            }
        }
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        Ok(Self {
            inner,
            bytes,
            bos_text: text_of(bos),
            eos_text: text_of(eos),
            bos,
            eos,
            add_bos,
            end_of_generation,
        })
    }

    fn from_tokenizer_json(path: &Path, content: &gguf_file::Content) -> Result<Self, EngineError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let size = inner.get_vocab_size(true);
        let special: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let byte_level = inner.token_to_id("Ġ").is_some();
        let bytes = (0..size as u32)
            .map(|id| {
                if special.contains(&id) {
                    return Vec::new();
                }
                let t = inner.id_to_token(id).unwrap_or_default();
                if byte_level {
                    byte_level_decode(&t)
                } else {
                    sentencepiece_decode(&t)
                }
            })
            .collect();
        let SpecialIds {
            bos,
            eos,
            add_bos,
            mut end_of_generation,
        } = special_ids(content);
        for name in END_OF_GENERATION_NAMES {
            if let Some(id) = inner.token_to_id(name).filter(|id| special.contains(id)) {
                end_of_generation.insert(id);
            }
        }
        let text_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        Ok(Self {
            bos_text: text_of(bos),
            eos_text: text_of(eos),
            inner,
            bytes,
            bos,
            eos,
            add_bos,
            end_of_generation,
        })
    }

    /// Tokenizes text; special tokens written in the text (`<|im_start|>`) become their ids, as
    /// llama.cpp does. BOS is prepended when the model asks for it and the text lacks it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(format!("encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.bos.filter(|_| self.add_bos)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Raw bytes of one token; empty for special tokens and ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The tokenizer in Hugging Face `tokenizer.json` form (what `load` accepts beside a model).
    pub fn to_tokenizer_json(&self) -> Result<String, EngineError> {
        self.inner
            .to_string(false)
            .map_err(|e| tok_err(format!("serializing tokenizer.json: {e}")))
    }

    /// Every token as bytes for a grammar engine's trie: control tokens as `\xFF<name>`, which
    /// no text produces.
    pub fn trie_words(&self) -> Vec<Vec<u8>> {
        (0..self.bytes.len() as u32)
            .map(|id| {
                let b = self.token_bytes(id);
                if !b.is_empty() {
                    return b.to_vec();
                }
                let name = self
                    .inner
                    .id_to_token(id)
                    .unwrap_or_else(|| format!("<[{id}]>"));
                let mut w = vec![0xFF];
                w.extend_from_slice(name.as_bytes());
                w
            })
            .collect()
    }

    /// The tokens that end a generation.
    pub fn end_of_generation_ids(&self) -> Vec<u32> {
        self.end_of_generation.iter().copied().collect()
    }

    /// The model's end-of-sequence token, when it declares one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn bos_text(&self) -> &str {
        &self.bos_text
    }

    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }
}

/// BOS/EOS and end-of-generation ids as the GGUF metadata declares them.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_generation: HashSet<u32>,
}

fn special_ids(content: &gguf_file::Content) -> SpecialIds {
    let eos = meta_u32(content, "tokenizer.ggml.eos_token_id");
    let mut end_of_generation: HashSet<u32> = eos.into_iter().collect();
    if let Some(eot) = meta_u32(content, "tokenizer.ggml.eot_token_id") {
        end_of_generation.insert(eot);
    }
    SpecialIds {
        bos: meta_u32(content, "tokenizer.ggml.bos_token_id"),
        eos,
        add_bos: meta(content, "tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        end_of_generation,
    }
}

/// BPE merges equivalent to SentencePiece's BPE: every split of a normal token into two normal
/// tokens, the merge ranked by the merged token's score (SentencePiece joins the adjacent pair
/// whose union scores highest, which is what these ranks make the BPE do).
fn spm_merges(tokens: &[String], scores: &[f32], types: &[u32]) -> Vec<[String; 2]> {
    const TOKEN_TYPE_NORMAL: u32 = 1;
    let normal =
        |id: usize| types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL) == TOKEN_TYPE_NORMAL;
    let pieces: HashSet<&str> = tokens
        .iter()
        .enumerate()
        .filter(|(id, _)| normal(*id))
        .map(|(_, t)| t.as_str())
        .collect();
    let mut merges: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, t) in tokens.iter().enumerate().filter(|(id, _)| normal(*id)) {
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if pieces.contains(l) && pieces.contains(r) {
                merges.push((score, id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    merges
        .into_iter()
        .map(|(_, _, l, r)| [l.to_owned(), r.to_owned()])
        .collect()
}

fn pre_tokenizer_for(pre: &str) -> serde_json::Value {
    let gpt2 = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let bytes_only = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    match pre {
        // Every digit on its own, then the GPT-2 split.
        "smollm" | "starcoder" | "refact" | "codeshell" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, gpt2],
        }),
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                bytes_only,
            ],
        }),
        "qwen2" | "deepseek-r1-qwen" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                bytes_only,
            ],
        }),
        "gpt2" | "default" | "gpt-2" => gpt2,
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre, using the GPT-2 split"
            );
            gpt2
        }
    }
}

/// GPT-2's byte ↔ printable-char table: printable Latin-1 bytes map to themselves, the rest to
/// U+0100 onward in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

fn byte_level_decode(token: &str) -> Vec<u8> {
    thread_local! {
        static INVERSE: std::collections::HashMap<char, u8> = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
    }
    INVERSE.with(|inv| {
        let mut out = Vec::with_capacity(token.len());
        for c in token.chars() {
            match inv.get(&c) {
                Some(b) => out.push(*b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out
    })
}

/// SentencePiece pieces: `▁` is a space and `<0xAB>` a raw byte.
fn sentencepiece_decode(token: &str) -> Vec<u8> {
    if token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && let Ok(b) = u8::from_str_radix(&token[3..5], 16)
    {
        return vec![b];
    }
    token.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_round_trips_every_byte() {
        let table = byte_to_char_table();
        let all: String = table.iter().collect();
        assert_eq!(byte_level_decode(&all), (0..=255u8).collect::<Vec<_>>());
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn sentencepiece_pieces_decode() {
        assert_eq!(sentencepiece_decode("▁Hello"), b" Hello");
        assert_eq!(sentencepiece_decode("<0x0A>"), b"\n");
    }
}
