//! The inference thread and the generation loop.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use candle_core::Device;

use crate::model::LlamaModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, StopScan};
use crate::template::{CHATML, ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Utf8Stream};

/// Prompt tokens per forward pass during prefill: small enough that cancellation and deadlines
/// are noticed well within a second, large enough to keep matmuls efficient.
const PREFILL_CHUNK: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => (
                k,
                n.parse::<usize>()
                    .map_err(|_| format!("device `{s}`: `{n}` is not a device number"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "cpu" if !s.contains(':') => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(ordinal)),
            "metal" => Ok(Self::Metal(ordinal)),
            _ => Err(format!("device `{s}`: expected cpu, cuda[:N] or metal[:N]")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceSpec {
    fn open(self) -> Result<Device, EngineError> {
        let dev = match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n),
            Self::Metal(n) => Device::new_metal(n),
        };
        dev.map_err(|e| EngineError::Device(format!("{self}: {e}")))
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceSpec,
    /// Repack quantized types without a fast CPU kernel (Q4_1, Q5_x) to Q8_0 at load.
    pub repack_on_cpu: bool,
    /// Lower the context limit below what the model declares (never above it).
    pub max_context: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            // Off: Q8_0 repacking changes greedy answers against llama.cpp's reference.
            repack_on_cpu: false,
            max_context: None,
        }
    }
}

/// What a loaded model is, for `/health`, logs and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub architecture: String,
    pub device: String,
    /// The limit every request is held to (prompt + max_tokens).
    pub context_length: usize,
    /// What the model file declares.
    pub trained_context_length: usize,
    pub vocab_size: usize,
    pub file_type: String,
    pub compute_type: String,
    pub file_bytes: u64,
    pub load_seconds: f64,
}

/// A prompt before rendering.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    StopSequence,
    Cancelled,
    Deadline,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSummary {
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Waiting for the engine thread.
    pub queue_seconds: f64,
    /// Prompt processing up to and including the first sampled token.
    pub prefill_seconds: f64,
    /// Every token after the first.
    pub decode_seconds: f64,
    /// From job acceptance to the first token (None when none was produced).
    pub time_to_first_token: Option<f64>,
    pub total_seconds: f64,
}

/// What the inference thread reports for a job; exactly one `Finished` or `Failed` ends it.
#[derive(Debug)]
pub enum GenEvent {
    /// The first sampled token exists (text may still be held back by stop matching).
    FirstToken,
    /// New text, completed by generated token `index`.
    Text {
        index: usize,
        text: String,
    },
    Finished(GenerationSummary),
    Failed(EngineError),
}

/// Receives events; returning false means nobody is listening any more (cancel).
pub type EventSink = Box<dyn FnMut(GenEvent) -> bool + Send>;

pub struct GenerationJob {
    pub prompt_tokens: Vec<u32>,
    pub params: GenerationParams,
    pub cancel: Arc<AtomicBool>,
    pub deadline: Option<Instant>,
    pub accepted_at: Instant,
    pub sink: EventSink,
    /// Dropped on the inference thread once the job is over, before the final event is sent
    /// (e.g. a slot permit).
    pub on_done: Option<Box<dyn Send>>,
}

struct Shared {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
}

/// Handle to a loaded model and its inference thread. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<GenerationJob>,
}

impl Engine {
    /// Loads the model and starts the inference thread. Blocking: call off the async runtime.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let device = opts.device.open()?;
        let file_bytes = std::fs::metadata(path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?
            .len();
        let (model, content) = LlamaModel::load(path, &device, opts.repack_on_cpu)?;
        let tokenizer = Tokenizer::load(path, &content)?;
        let template_src = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let template = match template_src {
            Some(src) => ChatTemplate::new(&src, tokenizer.bos_text(), tokenizer.eos_text())?,
            None => {
                tracing::warn!("model has no chat template, using ChatML");
                ChatTemplate::new(CHATML, tokenizer.bos_text(), tokenizer.eos_text())?
            }
        };
        let cfg = model.config().clone();
        let context_length = opts
            .max_context
            .map_or(cfg.context_length, |m| m.min(cfg.context_length));
        let info = ModelInfo {
            name: cfg.name.clone(),
            path: path.to_path_buf(),
            architecture: cfg.architecture.clone(),
            device: opts.device.to_string(),
            context_length,
            trained_context_length: cfg.context_length,
            vocab_size: cfg.vocab,
            file_type: cfg.file_type.clone(),
            compute_type: cfg.compute_type.clone(),
            file_bytes,
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        let shared = Arc::new(Shared {
            tokenizer,
            template,
            info,
        });
        let (tx, rx) = mpsc::channel::<GenerationJob>();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || inference_thread(model, thread_shared, rx))
            .map_err(|e| EngineError::Model(format!("cannot start the inference thread: {e}")))?;
        Ok(Self { shared, jobs: tx })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// Renders (chat) and tokenizes a prompt. CPU work: call off the async runtime for big input.
    pub fn prepare(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(msgs) => {
                let msgs: Vec<Message<'_>> = msgs
                    .iter()
                    .map(|(role, content)| Message { role, content })
                    .collect();
                self.shared.template.render(&msgs)?
            }
        };
        self.shared.tokenizer.encode(&text)
    }

    /// Queues a job for the inference thread (which runs one at a time).
    pub fn submit(&self, job: GenerationJob) -> Result<(), EngineError> {
        self.jobs.send(job).map_err(|_| EngineError::Stopped)
    }
}

fn inference_thread(model: LlamaModel, shared: Arc<Shared>, rx: mpsc::Receiver<GenerationJob>) {
    while let Ok(mut job) = rx.recv() {
        // A panic inside candle must fail this job, not kill the thread for every later one.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            generate(&model, &shared.tokenizer, &mut job)
        }))
        .unwrap_or_else(|_| Err(EngineError::Model("inference panicked".into())));
        let event = match result {
            Ok(summary) => GenEvent::Finished(summary),
            Err(e) => {
                tracing::error!(error = %e, "generation failed");
                GenEvent::Failed(e)
            }
        };
        // Release first: a client that has read the final event may send its next request at
        // once, and must find the worker free.
        drop(job.on_done.take());
        (job.sink)(event);
    }
}

fn generate(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    job: &mut GenerationJob,
) -> Result<GenerationSummary, EngineError> {
    let started = Instant::now();
    let accepted = job.accepted_at;
    let prompt = &job.prompt_tokens;
    let params = &job.params;
    let mut summary = GenerationSummary {
        stop_reason: StopReason::MaxTokens,
        prompt_tokens: prompt.len(),
        completion_tokens: 0,
        queue_seconds: started.duration_since(accepted).as_secs_f64(),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        time_to_first_token: None,
        total_seconds: 0.0,
    };
    let interrupted = |job: &GenerationJob| -> Option<StopReason> {
        if job.cancel.load(Ordering::Relaxed) {
            Some(StopReason::Cancelled)
        } else if job.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(StopReason::Deadline)
        } else {
            None
        }
    };
    let finish = |mut s: GenerationSummary, reason: StopReason| {
        s.stop_reason = reason;
        s.total_seconds = accepted.elapsed().as_secs_f64();
        s
    };
    if let Some(reason) = interrupted(job) {
        return Ok(finish(summary, reason));
    }

    let mut state = model.new_state(prompt.len() + params.max_tokens);
    let chunks: Vec<&[u32]> = prompt.chunks(PREFILL_CHUNK).collect();
    let mut logits = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        if let Some(reason) = interrupted(job) {
            return Ok(finish(summary, reason));
        }
        if let Some(l) = model.forward(chunk, &mut state, i + 1 == chunks.len())? {
            logits = l;
        }
    }

    let mut sampler = Sampler::new(params.sampling.clone());
    let mut history = prompt.clone();
    let mut utf8 = Utf8Stream::new();
    let mut stops = StopMatcher::new(params.stop.clone());
    let mut first_token_at = None;
    let mut reason = StopReason::MaxTokens;
    let mut listening = true;
    for index in 0..params.max_tokens {
        let next = sampler.sample(&mut logits, &history);
        if first_token_at.is_none() {
            let now = Instant::now();
            first_token_at = Some(now);
            summary.prefill_seconds = now.duration_since(started).as_secs_f64();
            summary.time_to_first_token = Some(now.duration_since(accepted).as_secs_f64());
            listening &= (job.sink)(GenEvent::FirstToken);
        }
        summary.completion_tokens += 1;
        if tokenizer.is_end_of_generation(next) {
            reason = StopReason::Eos;
            break;
        }
        history.push(next);
        let piece = utf8.push(tokenizer.token_bytes(next));
        match stops.push(&piece) {
            StopScan::Emit(text) => {
                if !text.is_empty() {
                    listening &= (job.sink)(GenEvent::Text { index, text });
                }
            }
            StopScan::Stopped(text) => {
                if !text.is_empty() {
                    (job.sink)(GenEvent::Text { index, text });
                }
                reason = StopReason::StopSequence;
                break;
            }
        }
        if !listening {
            reason = StopReason::Cancelled;
            break;
        }
        if index + 1 == params.max_tokens {
            break;
        }
        if let Some(r) = interrupted(job) {
            reason = r;
            break;
        }
        logits = model
            .forward(&[next], &mut state, true)?
            .ok_or_else(|| EngineError::Model("no logits".into()))?;
    }
    if reason != StopReason::StopSequence {
        // Bytes held by the UTF-8 decoder still go through stop matching.
        let index = summary.completion_tokens.saturating_sub(1);
        let mut tail = String::new();
        match stops.push(&utf8.flush()) {
            StopScan::Emit(t) => {
                tail.push_str(&t);
                tail.push_str(&stops.flush());
            }
            StopScan::Stopped(t) => {
                tail.push_str(&t);
                reason = StopReason::StopSequence;
            }
        }
        if !tail.is_empty() && listening {
            (job.sink)(GenEvent::Text { index, text: tail });
        }
    }
    if let Some(first) = first_token_at {
        summary.decode_seconds = first.elapsed().as_secs_f64();
    }
    Ok(finish(summary, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("metal".parse::<DeviceSpec>(), Ok(DeviceSpec::Metal(0)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("cpu:1".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }
}
