//! Turning logits into the next token: repetition penalty, then greedy (temperature 0) or
//! temperature → top-k → top-p → min-p → a draw from a seeded generator, so the same seed gives
//! the same text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings, already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In [0, 1); 0 disables.
    pub min_p: f32,
    /// 1 disables; > 1 discourages tokens seen in the window.
    pub repetition_penalty: f32,
    /// How many of the most recent tokens (prompt included) the penalty looks at.
    pub repetition_window: usize,
    /// OpenAI's: subtracted from the logit of every token generated so far, once. In [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated. In [-2, 2].
    pub frequency_penalty: f32,
    /// Added to these tokens' logits before anything else (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

/// Temperatures below this sample greedily.
pub const MIN_TEMPERATURE: f32 = 1e-4;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffers reused across steps to keep the hot loop allocation-free.
    candidates: Vec<(u32, f32)>,
    /// How often each token was generated (only with a presence or frequency penalty).
    generated: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
            generated: std::collections::HashMap::new(),
        }
    }

    /// Picks the next token. `history` is every token so far (prompt and generated); the
    /// presence and frequency penalties count what this sampler picked.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 {
            return self.pick(logits, history);
        }
        for (&t, &n) in &self.generated {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
        let next = self.pick(logits, history);
        *self.generated.entry(next).or_insert(0) += 1;
        next
    }

    fn pick(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 && p.repetition_window > 0 {
            apply_repetition_penalty(logits, history, p.repetition_penalty, p.repetition_window);
        }
        // Below this, 1/temperature overflows towards inf and the softmax turns to NaN; such a
        // temperature means greedy anyway.
        if p.temperature < MIN_TEMPERATURE {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(p.top_k - 1, by_value_desc);
            self.candidates.truncate(p.top_k);
        }
        // Softmax over what is left (max first, so exp never overflows).
        let max = self
            .candidates
            .iter()
            .fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut sum = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        for c in self.candidates.iter_mut() {
            c.1 /= sum;
        }
        // The steps below walk the candidates from the most likely down and rarely go far, so
        // they are put in order a prefix at a time instead of sorting the whole vocabulary.
        let mut order = SortedPrefix::default();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0f32;
            let mut keep = self.candidates.len();
            let mut i = 0;
            while i < self.candidates.len() {
                order.extend_to(&mut self.candidates, i + 1);
                cumulative += self.candidates[i].1;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    break;
                }
                i += 1;
            }
            self.candidates.truncate(keep);
        }
        if p.min_p > 0.0 {
            order.extend_to(&mut self.candidates, 1);
            let floor = self.candidates[0].1 * p.min_p;
            let mut keep = 1;
            while keep < self.candidates.len() {
                order.extend_to(&mut self.candidates, keep + 1);
                if self.candidates[keep].1 < floor {
                    break;
                }
                keep += 1;
            }
            self.candidates.truncate(keep);
        }
        // Summed in f64 so the total does not depend on how far the candidates were ordered.
        let total = self.candidates.iter().map(|c| f64::from(c.1)).sum::<f64>() as f32;
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..self.candidates.len() {
            order.extend_to(&mut self.candidates, i + 1);
            r -= self.candidates[i].1;
            if r <= 0.0 {
                return self.candidates[i].0;
            }
        }
        self.candidates[self.candidates.len() - 1].0
    }
}

/// Most likely first; equal values by token id, so the order never depends on the input order.
fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// How much of a candidate list is in [`by_value_desc`] order; `extend_to` orders more of it,
/// in growing chunks, so walking the top of a 50k vocabulary sorts a few hundred entries.
#[derive(Default)]
struct SortedPrefix {
    len: usize,
}

impl SortedPrefix {
    /// The first `n` entries (at least) are the `n` largest, in order.
    fn extend_to(&mut self, c: &mut [(u32, f32)], n: usize) {
        let n = n.min(c.len());
        if n <= self.len {
            return;
        }
        let rest = &mut c[self.len..];
        let want = (n - self.len).max(self.len).max(64).min(rest.len());
        if want < rest.len() {
            rest.select_nth_unstable_by(want - 1, by_value_desc);
        }
        rest[..want].sort_unstable_by(by_value_desc);
        self.len += want;
    }
}

/// Index of the largest logit; the lowest index wins a tie so greedy runs are stable.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// CTRL-style penalty as llama.cpp applies it: positive logits are divided, negative ones
/// multiplied, once per distinct token in the window.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32, window: usize) {
    let start = history.len().saturating_sub(window);
    let mut seen = std::collections::HashSet::new();
    for &t in &history[start..] {
        if !seen.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 42,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9, -3.0], &[]), 1);
    }

    #[test]
    fn a_vanishing_temperature_is_greedy_not_nan() {
        let mut s = Sampler::new(params(1e-30));
        assert_eq!(s.sample(&mut [0.1, 2.0, 1.9, -3.0], &[]), 1);
    }

    #[test]
    fn greedy_tie_goes_to_the_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.5)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 4.9, 1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Token 0 holds ~0.997 of the mass: a nucleus of 0.5 is token 0 alone.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 4.0, 3.0, 2.0], &[]), 0);
        }
    }

    /// The same draw as ordering every candidate first (what the lazy prefix sort replaces).
    fn sample_fully_sorted(p: &SamplingParams, rng: &mut StdRng, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / p.temperature;
        let mut c: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_value_desc);
            c.truncate(p.top_k);
        }
        let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        let mut sum = 0.0f32;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        for x in c.iter_mut() {
            x.1 /= sum;
        }
        c.sort_unstable_by(by_value_desc);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0f32;
            let keep = c
                .iter()
                .position(|x| {
                    cumulative += x.1;
                    cumulative >= p.top_p
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        let total = c.iter().map(|x| f64::from(x.1)).sum::<f64>() as f32;
        let mut r = rng.random::<f32>() * total;
        for x in &c {
            r -= x.1;
            if r <= 0.0 {
                return x.0;
            }
        }
        c[c.len() - 1].0
    }

    #[test]
    fn partial_ordering_draws_what_a_full_sort_draws() {
        let mut gen_rng = StdRng::seed_from_u64(7);
        let settings = [
            (1.0, 1.0, 0, 0.0),
            (0.8, 0.95, 0, 0.0),
            (1.5, 0.999, 0, 0.0),
            (1.0, 1.0, 40, 0.05),
            (0.7, 0.9, 0, 0.02),
            (2.0, 1.0, 0, 0.0),
        ];
        for (temperature, top_p, top_k, min_p) in settings {
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                seed: 3,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(p.clone());
            let mut reference_rng = StdRng::seed_from_u64(p.seed);
            for _ in 0..40 {
                // A 5,000-entry vocabulary with a peaked head and a long, flat tail.
                let logits: Vec<f32> = (0..5000)
                    .map(|i| {
                        let v: f32 = gen_rng.random::<f32>() * 4.0;
                        if i % 331 == 0 { v + 8.0 } else { v }
                    })
                    .collect();
                let want = sample_fully_sorted(&p, &mut reference_rng, &logits);
                let got = sampler.sample(&mut logits.clone(), &[]);
                assert_eq!(got, want, "{p:?}");
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        // Token 2 is e^-3 ≈ 0.05 of the best: always dropped; 0 and 1 are equal and stay.
        let mut seen = [0u32; 3];
        for _ in 0..200 {
            seen[s.sample(&mut [1.0, 1.0, -2.0], &[]) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 0 && seen[1] > 0);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut logits = [2.0, -2.0, 2.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1], 2.0, 64);
        assert_eq!(logits, [1.0, -4.0, 2.0]);
    }

    #[test]
    fn repetition_window_limits_the_lookback() {
        let mut logits = [2.0, 2.0];
        apply_repetition_penalty(&mut logits, &[0, 1], 2.0, 1);
        assert_eq!(logits, [2.0, 1.0]);
    }

    #[test]
    fn non_finite_logits_never_win_a_draw() {
        let mut s = Sampler::new(params(1.0));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [f32::NAN, 0.0, f32::NEG_INFINITY], &[]), 1);
        }
    }

    #[test]
    fn presence_and_frequency_penalties_push_generated_tokens_down() {
        // Greedy: token 1 leads by 1.0 at every step.
        let logits = [0.0f32, 3.0, 2.0, 1.5];
        let picks = |presence: f32, frequency: f32| {
            let mut s = Sampler::new(SamplingParams {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..params(0.0)
            });
            (0..4)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<u32>>()
        };
        assert_eq!(picks(0.0, 0.0), [1, 1, 1, 1]);
        // Once generated, a token is 1.6 lower: 2, then 3, then 1 again (1.4 beats 0.4, -0.1).
        assert_eq!(picks(1.6, 0.0), [1, 2, 3, 1]);
        // Frequency grows with each pick: 1 at 3.0, then 2.0 (ties go to the lower id)...
        assert_eq!(picks(0.0, 1.0), [1, 1, 2, 3]);
        // Negative values favour repeats.
        assert_eq!(picks(-2.0, 0.0), [1, 1, 1, 1]);
    }

    #[test]
    fn logit_bias_bans_and_favours_tokens() {
        let logits = [0.0f32, 3.0, 2.0, 1.5];
        let pick = |bias: Vec<(u32, f32)>| {
            let mut s = Sampler::new(SamplingParams {
                logit_bias: bias,
                ..params(0.0)
            });
            s.sample(&mut logits.clone(), &[])
        };
        assert_eq!(pick(vec![]), 1);
        assert_eq!(pick(vec![(1, -100.0)]), 2);
        assert_eq!(pick(vec![(0, 100.0)]), 0);
        // An id beyond the vocabulary is ignored (the worker refuses it before).
        assert_eq!(pick(vec![(99, 100.0)]), 1);
    }
}
