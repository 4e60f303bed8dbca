//! Candle inference for GGUF transformer models (llama, Qwen, Gemma, Phi families), with no
//! network code.
//!
//! [`Engine::load`] reads a GGUF file (weights, tokenizer, chat template) onto a device and
//! starts one dedicated inference thread that owns the model. Callers render and tokenize a
//! prompt with [`Engine::prepare`] (any thread), then [`Engine::submit`] a [`GenerationJob`];
//! the thread batches every running job into one forward pass per step (see `batch`) and
//! reports through each job's sink.
//! Nothing here runs on an async runtime.

mod batch;
mod constraint;
mod detok;
mod engine;
mod kv;
mod logprobs;
mod model;
mod qmatmul;
mod sampling;
mod stop;
mod template;
mod tokenizer;

pub use constraint::{Grammar, GrammarCompiler, TokenConstraint, compact_json_schema};
pub use detok::Utf8Stream;
pub use engine::{
    DeviceSpec, Engine, EngineLoad, GenEvent, GenerationJob, GenerationParams, GenerationSummary,
    LoadOptions, ModelInfo, Prompt, StepObserver, StepReport, StopReason, default_kv_tokens,
    default_parallel,
};
pub use kv::SeqKv;
pub use logprobs::{MAX_TOP_LOGPROBS, TokenLogprob, TokenProb};
pub use model::{BatchItem, ModelConfig, SUPPORTED_ARCHITECTURES, Transformer};
pub use qmatmul::Q41Matrix;
pub use sampling::{Sampler, SamplingParams, apply_repetition_penalty, argmax};
pub use stop::{StopMatcher, StopScan};
pub use template::{CHATML, ChatTemplate, Message, ToolFormat, Turn};
pub use tokenizer::Tokenizer;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("device: {0}")]
    Device(String),
    #[error("context length exceeded: {needed} positions needed, the limit is {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("the inference thread has stopped")]
    Stopped,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}
