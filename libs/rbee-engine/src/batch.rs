//! The inference thread: continuous batching over a fixed number of slots.
//!
//! Each step is one forward pass for every running sequence together: one token for each
//! sequence that is generating, and prompt pieces for those still reading their prompt, under a
//! per-step token budget, so running streams keep a steady pace while a long prompt is read.
//! New requests join at step boundaries; finished, cancelled or deadline-hit ones leave before
//! the next step without disturbing the others.
//!
//! Memory: a sequence reserves `prompt + max_tokens` positions of the KV pool when admitted
//! (its buffers grow on demand up to that), so load can never make a step run out of memory;
//! when the pool is full, new sequences wait. Finished sequences leave their attention state in
//! a prefix cache (inside the same pool, evicted oldest first when a new sequence needs room),
//! and a prompt that starts with a cached sequence's tokens copies that state instead of
//! recomputing it.
//!
//! Prompt pieces are aligned to multiples of [`PREFILL_CHUNK`] positions, so a prompt is cut at
//! the same places whatever else runs, and each row's arithmetic in the forward pass is
//! independent of the other rows (attention runs row by row): a sequence's results depend
//! neither on its company nor on how much of its prompt came from the prefix cache.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use crate::engine::{
    EngineLoad, GenEvent, GenerationJob, GenerationSummary, StepObserver, StepReport, StopReason,
};
use crate::kv::SeqKv;
use crate::logprobs::{StepLogprobs, TokenLogprob};
use crate::model::{BatchItem, Transformer};
use crate::sampling::Sampler;
use crate::stop::{StopMatcher, StopScan};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Utf8Stream};

/// Prompt positions per piece: small enough that running streams are not held up for long,
/// large enough to keep the matmuls efficient.
pub(crate) const PREFILL_CHUNK: usize = 128;

/// Prefix-cache entries kept at most, whatever room the pool has.
const MAX_CACHED_PREFIXES: usize = 64;

/// Shared counters behind [`crate::Engine::load_state`].
#[derive(Default)]
pub(crate) struct LoadCounters {
    pub slots: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_total: AtomicUsize,
    pub kv_reserved: AtomicUsize,
    pub kv_cached: AtomicUsize,
}

impl LoadCounters {
    pub(crate) fn snapshot(&self) -> EngineLoad {
        EngineLoad {
            slots: self.slots.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            kv_total_tokens: self.kv_total.load(Ordering::Relaxed),
            kv_reserved_tokens: self.kv_reserved.load(Ordering::Relaxed),
            kv_cached_tokens: self.kv_cached.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct BatchConfig {
    pub parallel: usize,
    pub kv_tokens: usize,
}

/// A finished sequence's attention state, kept for prompts that start the same way.
struct CachedPrefix {
    tokens: Vec<u32>,
    kv: SeqKv,
}

/// A sequence in a slot.
struct Seq {
    job: GenerationJob,
    kv: SeqKv,
    /// Prompt then generated tokens; `kv` holds the first `kv.len()` of them.
    history: Vec<u32>,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    summary: GenerationSummary,
    admitted: Instant,
    first_token_at: Option<Instant>,
    listening: bool,
    /// Log-probabilities of tokens whose text has not been sent yet.
    logprobs: Vec<TokenLogprob>,
}

impl Seq {
    /// Tokens not yet in the KV state.
    fn pending(&self) -> usize {
        self.history.len() - self.kv.len()
    }

    fn interrupted(&self) -> Option<StopReason> {
        interrupted(&self.job)
    }

    /// Samples the next token from `logits`; Some when the sequence is done.
    fn on_logits(
        &mut self,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
    ) -> Result<Option<StopReason>, EngineError> {
        let index = self.summary.completion_tokens;
        let step_logprobs = self
            .job
            .params
            .logprobs
            .map(|k| StepLogprobs::new(logits, k));
        if let Some(c) = &mut self.job.constraint {
            c.apply(logits)?;
        }
        let next = self.sampler.sample(logits, &self.history);
        if self.first_token_at.is_none() {
            let now = Instant::now();
            self.first_token_at = Some(now);
            self.summary.prefill_seconds = now.duration_since(self.admitted).as_secs_f64();
            self.summary.time_to_first_token =
                Some(now.duration_since(self.job.accepted_at).as_secs_f64());
            self.listening &= (self.job.sink)(GenEvent::FirstToken);
        }
        self.summary.completion_tokens += 1;
        if tokenizer.is_end_of_generation(next) {
            return Ok(Some(StopReason::Eos));
        }
        if let Some(s) = step_logprobs {
            self.logprobs.push(s.finish(next, tokenizer));
        }
        let grammar_done = match &mut self.job.constraint {
            Some(c) => c.commit(next)?,
            None => false,
        };
        self.history.push(next);
        let piece = self.utf8.push(tokenizer.token_bytes(next));
        match self.stops.push(&piece) {
            StopScan::Emit(text) => {
                if !text.is_empty() {
                    self.listening &= self.send_text(index, text);
                }
            }
            StopScan::Stopped(text) => {
                if !text.is_empty() {
                    self.send_text(index, text);
                }
                return Ok(Some(StopReason::StopSequence));
            }
        }
        if !self.listening {
            return Ok(Some(StopReason::Cancelled));
        }
        if grammar_done {
            return Ok(Some(StopReason::Eos));
        }
        if index + 1 >= self.job.params.max_tokens {
            return Ok(Some(StopReason::MaxTokens));
        }
        Ok(None)
    }

    /// Sends text with the log-probabilities of the tokens it completes.
    fn send_text(&mut self, index: usize, text: String) -> bool {
        let logprobs = std::mem::take(&mut self.logprobs);
        (self.job.sink)(GenEvent::Text {
            index,
            text,
            logprobs,
        })
    }

    /// Flushes held-back text and reports the end. Returns what the prefix cache may keep.
    fn finish(mut self, mut reason: StopReason) -> CachedPrefix {
        if reason != StopReason::StopSequence {
            // Bytes held by the UTF-8 decoder still go through stop matching.
            let index = self.summary.completion_tokens.saturating_sub(1);
            let mut tail = String::new();
            match self.stops.push(&self.utf8.flush()) {
                StopScan::Emit(t) => {
                    tail.push_str(&t);
                    tail.push_str(&self.stops.flush());
                }
                StopScan::Stopped(t) => {
                    tail.push_str(&t);
                    reason = StopReason::StopSequence;
                }
            }
            if (!tail.is_empty() || !self.logprobs.is_empty()) && self.listening {
                self.send_text(index, tail);
            }
        }
        if let Some(first) = self.first_token_at {
            self.summary.decode_seconds = first.elapsed().as_secs_f64();
        }
        self.summary.stop_reason = reason;
        self.summary.total_seconds = self.job.accepted_at.elapsed().as_secs_f64();
        // Release first: a client that has read the final event may send its next request at
        // once, and must find the slot free.
        drop(self.job.on_done.take());
        (self.job.sink)(GenEvent::Finished(self.summary));
        let len = self.kv.len();
        self.history.truncate(len);
        CachedPrefix {
            tokens: self.history,
            kv: self.kv,
        }
    }

    fn fail(mut self, err: EngineError) {
        tracing::error!(error = %err, "generation failed");
        drop(self.job.on_done.take());
        (self.job.sink)(GenEvent::Failed(err));
    }
}

fn interrupted(job: &GenerationJob) -> Option<StopReason> {
    if job.cancel.load(Ordering::Relaxed) {
        Some(StopReason::Cancelled)
    } else if job.deadline.is_some_and(|d| Instant::now() >= d) {
        Some(StopReason::Deadline)
    } else {
        None
    }
}

/// Ends a job that never got a slot.
fn finish_unstarted(mut job: GenerationJob, reason: StopReason) {
    let summary = GenerationSummary {
        stop_reason: reason,
        prompt_tokens: job.prompt_tokens.len(),
        completion_tokens: 0,
        cached_tokens: 0,
        queue_seconds: job.accepted_at.elapsed().as_secs_f64(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        time_to_first_token: None,
        total_seconds: job.accepted_at.elapsed().as_secs_f64(),
    };
    drop(job.on_done.take());
    (job.sink)(GenEvent::Finished(summary));
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub(crate) struct Batcher<'m> {
    model: &'m Transformer,
    tokenizer: &'m Tokenizer,
    cfg: BatchConfig,
    waiting: VecDeque<GenerationJob>,
    running: Vec<Seq>,
    /// Oldest first.
    cache: Vec<CachedPrefix>,
    load: Arc<LoadCounters>,
    observer: Option<Arc<dyn StepObserver>>,
}

impl<'m> Batcher<'m> {
    pub(crate) fn new(
        model: &'m Transformer,
        tokenizer: &'m Tokenizer,
        cfg: BatchConfig,
        load: Arc<LoadCounters>,
        observer: Option<Arc<dyn StepObserver>>,
    ) -> Self {
        load.slots.store(cfg.parallel, Ordering::Relaxed);
        load.kv_total.store(cfg.kv_tokens, Ordering::Relaxed);
        Self {
            model,
            tokenizer,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            cache: Vec::new(),
            load,
            observer,
        }
    }

    /// Runs until every sender is gone and no work is left.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<GenerationJob>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.leave_interrupted();
            self.admit();
            self.publish();
            if self.running.is_empty() {
                if !self.waiting.is_empty() {
                    // Nothing can run and nothing will free room: cannot happen while every
                    // reservation fits the pool, but never spin.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                continue;
            }
            self.step();
            self.publish();
        }
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(|s| s.kv.limit()).sum()
    }

    fn cached(&self) -> usize {
        self.cache.iter().map(|c| c.kv.allocated()).sum()
    }

    fn publish(&self) {
        let l = &self.load;
        l.running.store(self.running.len(), Ordering::Relaxed);
        l.waiting.store(self.waiting.len(), Ordering::Relaxed);
        l.kv_reserved.store(self.reserved(), Ordering::Relaxed);
        l.kv_cached.store(self.cached(), Ordering::Relaxed);
    }

    fn leave_interrupted(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            match self.running[i].interrupted() {
                Some(reason) => {
                    let seq = self.running.remove(i);
                    let kept = seq.finish(reason);
                    self.keep(kept);
                }
                None => i += 1,
            }
        }
        let waiting = std::mem::take(&mut self.waiting);
        for job in waiting {
            match interrupted(&job) {
                Some(reason) => finish_unstarted(job, reason),
                None => self.waiting.push_back(job),
            }
        }
    }

    fn keep(&mut self, mut entry: CachedPrefix) {
        if entry.kv.is_empty() {
            return;
        }
        // Kept entries hold only their computed positions.
        if let Err(e) = entry.kv.shrink(self.model.dims(), self.model.device()) {
            tracing::warn!(error = %e, "cannot shrink a finished sequence's KV; not kept");
            return;
        }
        // An entry that is a prefix of a newer one is worth nothing more.
        self.cache
            .retain(|c| common_prefix(&c.tokens, &entry.tokens) < c.tokens.len());
        self.cache.push(entry);
        if self.cache.len() > MAX_CACHED_PREFIXES {
            self.cache.remove(0);
        }
    }

    /// Moves waiting jobs into free slots, first come first served, while the pool has room.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.parallel {
            let Some(job) = self.waiting.front() else {
                return;
            };
            // A sibling still reading the shared prompt: wait and copy its state after.
            if job.prompt_group.is_some()
                && self
                    .running
                    .iter()
                    .any(|s| s.job.prompt_group == job.prompt_group && s.pending() > 1)
            {
                return;
            }
            let need = (job.prompt_tokens.len() + job.params.max_tokens).min(self.cfg.kv_tokens);
            let free = |s: &Self| s.cfg.kv_tokens.saturating_sub(s.reserved() + s.cached());
            while need > free(self) && !self.cache.is_empty() {
                self.cache.remove(0);
            }
            if need > free(self) {
                return;
            }
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            self.start(job, need);
        }
    }

    fn start(&mut self, mut job: GenerationJob, need: usize) {
        // The sequence's history owns the prompt from here on.
        let prompt = std::mem::take(&mut job.prompt_tokens);
        // The last prompt token is always run: its logits give the first generated token.
        let reusable = prompt.len().saturating_sub(1);
        let best = self
            .cache
            .iter()
            .enumerate()
            .map(|(i, c)| (i, common_prefix(&c.tokens, &prompt[..reusable])))
            .max_by_key(|&(i, n)| (n, i));
        // A sibling of the same prompt group that has read the prompt.
        let sibling = job
            .prompt_group
            .and_then(|g| {
                self.running
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.job.prompt_group == Some(g))
                    .map(|(i, s)| {
                        (
                            i,
                            common_prefix(&s.history[..s.kv.len()], &prompt[..reusable]),
                        )
                    })
                    .max_by_key(|&(_, n)| n)
            })
            .filter(|&(_, n)| n > best.map_or(0, |b| b.1));
        let mut kv = self.model.new_seq(need);
        let mut cached = 0;
        if let Some((i, n)) = sibling {
            match kv.copy_prefix(
                &self.running[i].kv,
                n,
                self.model.dims(),
                self.model.device(),
            ) {
                Ok(()) => cached = n,
                Err(e) => {
                    tracing::warn!(error = %e, "copying a sibling's prompt failed; reading it again");
                    kv = self.model.new_seq(need);
                }
            }
        } else if let Some((i, n)) = best
            && n > 0
        {
            let entry = self.cache.remove(i);
            if let Err(e) = kv.copy_prefix(&entry.kv, n, self.model.dims(), self.model.device()) {
                tracing::warn!(error = %e, "prefix reuse failed; recomputing the prompt");
                kv = self.model.new_seq(need);
            } else {
                cached = n;
            }
            self.cache.push(entry);
        }
        let summary = GenerationSummary {
            stop_reason: StopReason::MaxTokens,
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
            cached_tokens: cached,
            queue_seconds: job.accepted_at.elapsed().as_secs_f64(),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            time_to_first_token: None,
            total_seconds: 0.0,
        };
        let seq = Seq {
            sampler: Sampler::new(job.params.sampling.clone()),
            stops: StopMatcher::new(job.params.stop.clone()),
            utf8: Utf8Stream::new(),
            history: prompt,
            kv,
            summary,
            admitted: Instant::now(),
            first_token_at: None,
            listening: true,
            logprobs: Vec::new(),
            job,
        };
        if seq.job.params.max_tokens == 0 || seq.history.is_empty() {
            let kept = seq.finish(StopReason::MaxTokens);
            self.keep(kept);
            return;
        }
        self.running.push(seq);
    }

    /// How many pending tokens each running sequence feeds this step (0: waits).
    fn plan(&self) -> Vec<usize> {
        // Decode tokens come on top of the prompt budget, so a full piece always fits.
        let mut budget = PREFILL_CHUNK;
        self.running
            .iter()
            .map(|s| match s.pending() {
                0 => 0,
                1 => 1,
                pending => {
                    let piece = pending.min(PREFILL_CHUNK - s.kv.len() % PREFILL_CHUNK);
                    // Whole aligned pieces only, so cut points never depend on company; the
                    // first piece of a step always fits, so prompts always progress.
                    if piece <= budget {
                        budget -= piece;
                        piece
                    } else {
                        0
                    }
                }
            })
            .collect()
    }

    fn step(&mut self) {
        let plan = self.plan();
        let model = self.model;
        let started = Instant::now();
        let mut items = Vec::new();
        let mut members = Vec::new();
        for (i, (seq, &n)) in self.running.iter_mut().zip(&plan).enumerate() {
            if n == 0 {
                continue;
            }
            let from = seq.kv.len();
            let want_logits = from + n == seq.history.len();
            members.push((i, want_logits));
            items.push(BatchItem {
                tokens: &seq.history[from..from + n],
                kv: &mut seq.kv,
                want_logits,
            });
        }
        let tokens: usize = plan.iter().sum();
        let sequences = items.len();
        // A panic inside candle must fail this step's sequences, not kill the thread.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward_batch(&mut items)
        }))
        .unwrap_or_else(|_| Err(EngineError::Model("inference panicked".into())));
        drop(items);
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                let message = e.to_string();
                for (i, _) in members.iter().rev() {
                    let seq = self.running.remove(*i);
                    seq.fail(EngineError::Model(message.clone()));
                }
                return;
            }
        };
        if let Some(obs) = &self.observer {
            obs.on_step(&StepReport {
                sequences,
                tokens,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let mut done = Vec::new();
        for ((i, _), logits) in members.iter().zip(outputs) {
            if let Some(mut logits) = logits {
                match self.running[*i].on_logits(&mut logits, self.tokenizer) {
                    Ok(None) => {}
                    Ok(Some(reason)) => done.push((*i, Ok(reason))),
                    Err(e) => done.push((*i, Err(e))),
                }
            }
        }
        for (i, outcome) in done.into_iter().rev() {
            let seq = self.running.remove(i);
            match outcome {
                Ok(reason) => {
                    let kept = seq.finish(reason);
                    self.keep(kept);
                }
                Err(e) => seq.fail(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_leading_equal_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }
}
