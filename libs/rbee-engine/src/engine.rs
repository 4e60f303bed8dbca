//! The inference thread and the generation loop.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Instant;

use candle_core::Device;

use crate::EngineError;
use crate::batch::{BatchConfig, Batcher, LoadCounters};
use crate::constraint::{Grammar, GrammarCompiler, TokenConstraint};
use crate::logprobs::TokenLogprob;
use crate::model::Transformer;
use crate::sampling::SamplingParams;
use crate::template::{CHATML, ChatTemplate, Message, ToolFormat, Turn};
use crate::tokenizer::Tokenizer;

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
    /// Sequences generated together (slots); None picks [`default_parallel`].
    pub parallel: Option<usize>,
    /// KV pool size in positions, shared by all slots; None picks [`default_kv_tokens`].
    /// A request reserves `prompt + max_tokens` of it; the context limit never exceeds it.
    pub kv_tokens: Option<usize>,
}

/// Slots when none are asked for: enough for batching to pay on any device. Slots cost nothing
/// until used; memory is bounded by the KV pool.
pub fn default_parallel(device: DeviceSpec) -> usize {
    match device {
        DeviceSpec::Cpu => 8,
        DeviceSpec::Cuda(_) | DeviceSpec::Metal(_) => 16,
    }
}

/// KV pool when none is asked for: one full context, or 1024 positions per slot if that is
/// more (the pool is allocated as sequences use it, so this is a bound, not a cost).
pub fn default_kv_tokens(context: usize, parallel: usize) -> usize {
    context.max(parallel * context.min(1024))
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            // Off: Q8_0 repacking changes greedy answers against llama.cpp's reference.
            repack_on_cpu: false,
            max_context: None,
            parallel: None,
            kv_tokens: None,
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
    /// Sequences generated together.
    pub slots: usize,
    /// KV pool size in positions.
    pub kv_tokens: usize,
    /// Bytes of KV state per position.
    pub kv_bytes_per_token: usize,
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
    /// Turns with tool calls and results, and the tools shown to the model.
    Conversation {
        turns: Vec<Turn>,
        tools: Option<Vec<serde_json::Value>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Report each generated token's log-probability with this many alternatives (`Some(0)`:
    /// the token's own only).
    pub logprobs: Option<usize>,
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
    /// Prompt tokens whose attention state came from the prefix cache.
    pub cached_tokens: usize,
    /// Waiting for a slot.
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
    /// New text, completed by generated token `index`, with the log-probabilities of the
    /// tokens it comes from when they were asked for.
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Finished(GenerationSummary),
    Failed(EngineError),
}

/// Receives events; returning false means nobody is listening any more (cancel).
pub type EventSink = Box<dyn FnMut(GenEvent) -> bool + Send>;

pub struct GenerationJob {
    pub prompt_tokens: Vec<u32>,
    pub params: GenerationParams,
    /// A grammar every generated token must follow ([`Engine::compile_grammar`]).
    pub constraint: Option<TokenConstraint>,
    /// Jobs with the same prompt in one group (a request's several answers): the first reads
    /// the prompt, the others wait for it and copy its attention state instead of reading it
    /// again.
    pub prompt_group: Option<u64>,
    pub cancel: Arc<AtomicBool>,
    pub deadline: Option<Instant>,
    pub accepted_at: Instant,
    pub sink: EventSink,
    /// Dropped on the inference thread once the job is over, before the final event is sent
    /// (e.g. a slot permit).
    pub on_done: Option<Box<dyn Send>>,
}

/// What the engine is doing now, for `/health`, heartbeats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineLoad {
    pub slots: usize,
    pub running: usize,
    /// Accepted sequences waiting for a slot or for room in the KV pool.
    pub waiting: usize,
    pub kv_total_tokens: usize,
    /// Positions reserved by running sequences.
    pub kv_reserved_tokens: usize,
    /// Positions held by the prefix cache (given up when a new sequence needs room).
    pub kv_cached_tokens: usize,
}

/// One forward pass of the batch loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Sequences in the pass.
    pub sequences: usize,
    /// Tokens in the pass (one per generating sequence, plus prompt pieces).
    pub tokens: usize,
    pub seconds: f64,
}

/// Told about every step, on the inference thread: keep it cheap.
pub trait StepObserver: Send + Sync {
    fn on_step(&self, report: &StepReport);
}

struct Shared {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    load: Arc<LoadCounters>,
    /// Built on the first constrained request (tens of milliseconds for a 50k vocabulary).
    grammars: OnceLock<Result<GrammarCompiler, String>>,
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
        Self::load_observed(path, opts, None)
    }

    /// [`Engine::load`], with `observer` told about every batch step.
    pub fn load_observed(
        path: &Path,
        opts: &LoadOptions,
        observer: Option<Arc<dyn StepObserver>>,
    ) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let device = opts.device.open()?;
        let file_bytes = std::fs::metadata(path)
            .map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?
            .len();
        let (model, content) = Transformer::load(path, &device, opts.repack_on_cpu)?;
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
        let context = opts
            .max_context
            .map_or(cfg.context_length, |m| m.min(cfg.context_length));
        let parallel = opts
            .parallel
            .unwrap_or_else(|| default_parallel(opts.device))
            .max(1);
        let kv_tokens = opts
            .kv_tokens
            .unwrap_or_else(|| default_kv_tokens(context, parallel))
            .max(1);
        // One request must always fit the pool on its own.
        let context_length = context.min(kv_tokens);
        let info = ModelInfo {
            name: cfg.name.clone(),
            path: path.to_path_buf(),
            architecture: cfg.architecture.clone(),
            device: opts.device.to_string(),
            context_length,
            trained_context_length: cfg.context_length,
            slots: parallel,
            kv_tokens,
            kv_bytes_per_token: model.kv_bytes_per_position(),
            vocab_size: cfg.vocab,
            file_type: cfg.file_type.clone(),
            compute_type: cfg.compute_type.clone(),
            file_bytes,
            load_seconds: t0.elapsed().as_secs_f64(),
        };
        let load = Arc::new(LoadCounters::default());
        let shared = Arc::new(Shared {
            tokenizer,
            template,
            info,
            load: load.clone(),
            grammars: OnceLock::new(),
        });
        let (tx, rx) = mpsc::channel::<GenerationJob>();
        let thread_shared = shared.clone();
        let cfg = BatchConfig {
            parallel,
            kv_tokens,
        };
        // The batch loop runs on one of the pool's own threads, so a step's parallel work is
        // shared by exactly the pool's threads (`RAYON_NUM_THREADS`, else one per core). From a
        // thread outside the pool it would be that thread plus every pool thread, one more
        // runnable thread than cores, and the idle one's spinning and yielding then costs
        // every step context switches.
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("inference-{i}"))
            .build()
            .map_err(|e| EngineError::Model(format!("cannot start the inference threads: {e}")))?;
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                pool.install(|| {
                    Batcher::new(&model, &thread_shared.tokenizer, cfg, load, observer).run(rx)
                })
            })
            .map_err(|e| EngineError::Model(format!("cannot start the inference thread: {e}")))?;
        Ok(Self { shared, jobs: tx })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// Whether the model's chat template shows tools itself, and how the model writes calls.
    pub fn tool_support(&self) -> (bool, ToolFormat) {
        let t = &self.shared.template;
        (t.native_tools(), t.tool_format())
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
            Prompt::Conversation { turns, tools } => {
                self.shared.template.render_turns(turns, tools.as_deref())?
            }
        };
        self.shared.tokenizer.encode(&text)
    }

    /// A constraint for one job's tokens, or why the grammar is refused. CPU work (a JSON schema
    /// compiles in milliseconds): call off the async runtime.
    pub fn compile_grammar(&self, grammar: &Grammar) -> Result<TokenConstraint, EngineError> {
        match self
            .shared
            .grammars
            .get_or_init(|| GrammarCompiler::new(&self.shared.tokenizer).map_err(|e| e.to_string()))
        {
            Ok(compiler) => compiler.compile(grammar),
            Err(e) => Err(EngineError::Grammar(e.clone())),
        }
    }

    /// Slots, running and waiting sequences, KV pool use.
    pub fn load_state(&self) -> EngineLoad {
        self.shared.load.snapshot()
    }

    /// Queues a job for the inference thread; it joins the batch at the next step.
    pub fn submit(&self, job: GenerationJob) -> Result<(), EngineError> {
        self.jobs.send(job).map_err(|_| EngineError::Stopped)
    }

    /// Renders, submits and waits for one generation: its whole text and summary. Blocking.
    pub fn generate(
        &self,
        prompt: &Prompt,
        params: GenerationParams,
    ) -> Result<(String, GenerationSummary), EngineError> {
        let (tx, rx) = mpsc::channel();
        self.submit(GenerationJob {
            prompt_tokens: self.prepare(prompt)?,
            params,
            constraint: None,
            prompt_group: None,
            cancel: Arc::new(AtomicBool::new(false)),
            deadline: None,
            accepted_at: Instant::now(),
            sink: Box::new(move |e| tx.send(e).is_ok()),
            on_done: None,
        })?;
        let mut text = String::new();
        loop {
            match rx.recv().map_err(|_| EngineError::Stopped)? {
                GenEvent::Text { text: t, .. } => text.push_str(&t),
                GenEvent::FirstToken => {}
                GenEvent::Finished(s) => return Ok((text, s)),
                GenEvent::Failed(e) => return Err(e),
            }
        }
    }
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
