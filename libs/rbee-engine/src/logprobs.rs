//! Log-probabilities of sampled tokens and their strongest alternatives (OpenAI's `logprobs`),
//! from the model's own distribution: before temperature, penalties, biases and grammar masks.

use crate::Tokenizer;

/// Most alternatives a caller may ask for per token (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProb {
    pub id: u32,
    /// The token's text (invalid UTF-8 replaced; `bytes` has the exact bytes).
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A sampled token with the strongest alternatives at its position, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub chosen: TokenProb,
    pub top: Vec<TokenProb>,
}

/// The raw distribution of one step, kept until the token is sampled.
pub(crate) struct StepLogprobs {
    log_norm: f32,
    raw: Vec<f32>,
    top: Vec<(u32, f32)>,
}

impl StepLogprobs {
    /// `k` alternatives (at most [`MAX_TOP_LOGPROBS`]) of the logits as the model gave them.
    pub(crate) fn new(logits: &[f32], k: usize) -> Self {
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|&l| f64::from(l - max).exp())
            .sum();
        let log_norm = max + sum.ln() as f32;
        let k = k.min(MAX_TOP_LOGPROBS).min(logits.len());
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k > 0 {
            for (i, &l) in logits.iter().enumerate() {
                if !l.is_finite() {
                    continue;
                }
                if top.len() < k {
                    top.push((i as u32, l));
                    top.sort_by(|a, b| b.1.total_cmp(&a.1));
                } else if top.last().is_some_and(|&(_, m)| l > m) {
                    top.pop();
                    let at = top.partition_point(|&(_, v)| v >= l);
                    top.insert(at, (i as u32, l));
                }
            }
        }
        Self {
            log_norm,
            raw: logits.to_vec(),
            top,
        }
    }

    pub(crate) fn finish(self, chosen: u32, tokenizer: &Tokenizer) -> TokenLogprob {
        let prob = |id: u32, l: f32| {
            let bytes = tokenizer.token_bytes(id).to_vec();
            TokenProb {
                id,
                text: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob: l - self.log_norm,
            }
        };
        let raw = self
            .raw
            .get(chosen as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        TokenLogprob {
            chosen: prob(chosen, raw),
            top: self.top.iter().map(|&(id, l)| prob(id, l)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_alternatives_are_the_largest_logits_in_order() {
        let logits = [0.5f32, 3.0, -1.0, 2.0, f32::NEG_INFINITY, 2.5];
        let s = StepLogprobs::new(&logits, 3);
        let ids: Vec<u32> = s.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 5, 3]);
        // log-softmax: probabilities of every finite logit sum to one.
        let total: f32 = logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|l| (l - s.log_norm).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
}
