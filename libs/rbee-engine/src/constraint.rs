//! Constrained decoding: a grammar (JSON schema, Lark, regex) becomes a token mask at every
//! step, so the answer always parses.
//!
//! The grammar engine is llguidance (the one llama.cpp and vLLM use). It computes each step's
//! mask lazily from the tokenizer's byte trie, with no per-grammar index to build first, so a new
//! schema costs milliseconds, not seconds (outlines-core builds a full automaton up front and
//! needs the `tokenizers` C regex build). Control tokens enter the trie as `\xFF<name>`, so no
//! grammar text can produce them; end-of-generation tokens are allowed exactly when the grammar
//! may end.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::{EngineError, Tokenizer};

/// What an answer must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON schema (OpenAI's `json_schema`).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark syntax (may embed `%json { … }`).
    Lark(String),
    /// A regular expression the whole answer matches.
    Regex(String),
}

fn grammar_err(msg: impl std::fmt::Display) -> EngineError {
    EngineError::Grammar(msg.to_string())
}

/// A JSON schema whose JSON is written without optional whitespace: a small model left free to
/// pad with newlines may pad until `max_tokens`.
pub fn compact_json_schema(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(compact_json_schema(
                serde_json::json!({"type": "object"}),
            )),
            Grammar::JsonSchema(s) => {
                TopLevelGrammar::from_json_schema(compact_json_schema(s.clone()))
            }
            Grammar::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
        }
    }
}

/// Compiles grammars against one model's vocabulary; built once per model, on first use.
pub struct GrammarCompiler {
    factory: ParserFactory,
    end_of_generation: Arc<[u32]>,
    /// The end token llguidance knows of (the trie's EOS).
    eos: u32,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("eos", &self.eos)
            .finish()
    }
}

impl GrammarCompiler {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, EngineError> {
        let words = tokenizer.trie_words();
        let mut end_of_generation: Vec<u32> = tokenizer.end_of_generation_ids();
        end_of_generation.sort_unstable();
        let eos = tokenizer
            .eos_id()
            .or_else(|| end_of_generation.first().copied())
            .ok_or_else(|| grammar_err("the model declares no end-of-generation token"))?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(grammar_err)?;
        factory.quiet();
        Ok(Self {
            factory,
            end_of_generation: end_of_generation.into(),
            eos,
        })
    }

    /// A fresh constraint for one sequence, or why the grammar is refused.
    pub fn compile(&self, grammar: &Grammar) -> Result<TokenConstraint, EngineError> {
        let parser = self
            .factory
            .create_parser(grammar.top_level())
            .map_err(grammar_err)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(grammar_err(e));
        }
        Ok(TokenConstraint {
            matcher,
            end_of_generation: self.end_of_generation.clone(),
            eos: self.eos,
        })
    }
}

/// One sequence's grammar state: masks logits before sampling, follows each sampled token.
pub struct TokenConstraint {
    matcher: Matcher,
    end_of_generation: Arc<[u32]>,
    eos: u32,
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint").finish_non_exhaustive()
    }
}

impl TokenConstraint {
    /// Sets every token the grammar forbids to -inf.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        let mask = self.matcher.compute_mask_or_eos().map_err(grammar_err)?;
        let may_end = mask.is_allowed(self.eos);
        // The other end tokens are trie words of their own that no grammar text reaches:
        // keep their logits when the grammar may end.
        let saved: Vec<(usize, f32)> = self
            .end_of_generation
            .iter()
            .filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l)))
            .collect();
        mask_logits(&mask, logits);
        for (t, l) in saved {
            logits[t] = if may_end { l } else { f32::NEG_INFINITY };
        }
        Ok(())
    }

    /// Follows a sampled (non-end) token. True when the grammar is complete and nothing but
    /// the end may follow.
    pub fn commit(&mut self, token: u32) -> Result<bool, EngineError> {
        self.matcher.consume_token(token).map_err(grammar_err)?;
        Ok(self.matcher.is_stopped())
    }
}

/// -inf for every id the mask does not allow (ids past the mask, e.g. a padded output head,
/// included).
fn mask_logits(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (i, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(i).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (j, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << j) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_only_allowed_ids() {
        let mut mask = SimpleVob::alloc(70);
        mask.allow_token(3);
        mask.allow_token(40);
        let mut logits = vec![1.0f32; 80];
        mask_logits(&mask, &mut logits);
        let kept: Vec<usize> = (0..80).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, vec![3, 40]);
    }
}
