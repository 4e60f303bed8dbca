//! `cargo xtask bench load`: many streaming OpenAI clients at once through queen + hive, beside
//! llama.cpp's `llama-server` (`--parallel` = concurrency, same GGUF and threads) driven by the
//! same client in the same run.
//!
//! Each level runs `concurrency` clients that each send `--rounds` streaming chat requests one
//! after another; every prompt starts with its own number, so no prompt is a prefix of another
//! and neither server can reuse one. Figures per level: aggregate output tokens per second over
//! the level's wall time, TTFT and inter-token latency p50/p99, and the peak RSS of the serving
//! processes (every rbee worker; the llama-server process).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rbee_test_harness::{MODEL_FILE, SseData, SseReader, model_dir};
use serde_json::{Value, json};

use crate::bench::{peak_rss_mib, percentile};
use crate::cargo::build_release;
use crate::cli::flag;
use crate::model::fetch_model;
use crate::stack::{DEMO_MODEL, Signals, Stack, runtime};

const LEVELS: &[usize] = &[1, 2, 4, 8, 16];

const LOAD_USAGE: &str =
    "usage: cargo xtask bench load [--rounds N] [--max-tokens M] [--threads T] [--levels 1,2,4]";

#[derive(Debug, Clone, Default)]
struct Level {
    concurrency: usize,
    wall_s: f64,
    tokens: u64,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
    rss_mib: f64,
    failures: usize,
}

impl Level {
    fn tps(&self) -> f64 {
        if self.wall_s > 0.0 {
            self.tokens as f64 / self.wall_s
        } else {
            0.0
        }
    }
}

struct Target {
    url: String,
    token: Option<String>,
    model: String,
}

pub fn bench_load(args: &[String]) -> anyhow::Result<()> {
    let num = |name: &str, default: usize| -> anyhow::Result<usize> {
        Ok(flag(args, name)?
            .map(|s| s.parse())
            .transpose()
            .with_context(|| format!("{name} must be a number\n{LOAD_USAGE}"))?
            .unwrap_or(default))
    };
    let rounds = num("--rounds", 3)?;
    let max_tokens = num("--max-tokens", 64)?;
    let threads = num(
        "--threads",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    )?;
    let levels: Vec<usize> = match flag(args, "--levels")? {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--levels: {LOAD_USAGE}"))?,
        None => LEVELS.to_vec(),
    };
    if rounds == 0 || max_tokens < 2 || levels.is_empty() || levels.contains(&0) {
        bail!("{LOAD_USAGE}");
    }
    let model = fetch_model(&model_dir())?;
    let bin = build_release(&["queen-rbee", "rbee-hive", "llm-worker-rbee"])?;
    let llama = llama_server_binary();
    let rt = runtime()?;
    let (ours, theirs) = rt.block_on(async {
        let mut signals = Signals::new()?;
        let stack = tokio::select! {
            s = Stack::start(&bin, &model, DEMO_MODEL) => s?,
            sig = signals.recv() => bail!("{sig} during startup; stopped"),
        };
        let result = tokio::select! {
            r = run_rbee(&stack, &levels, rounds, max_tokens) => r,
            sig = signals.recv() => Err(anyhow::anyhow!("{sig}: stopped mid-benchmark")),
        };
        let stopped = stack.stop().await;
        let ours = result?;
        stopped?;
        let theirs = match &llama {
            Some(bin) => Some(run_llama(bin, &model, threads, &levels, rounds, max_tokens).await?),
            None => None,
        };
        Ok((ours, theirs))
    })?;
    print_report(&ours, theirs.as_deref(), rounds, max_tokens, threads);
    if llama.is_none() {
        println!(
            "\nllama-server not found (set LLAMA_SERVER or put it on PATH; see README \"Benchmarks\"): no reference figures"
        );
    }
    Ok(())
}

fn llama_server_binary() -> Option<PathBuf> {
    let p = std::env::var_os("LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("llama-server"));
    std::process::Command::new(&p)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .map(|_| p)
}

async fn run_rbee(
    stack: &Stack,
    levels: &[usize],
    rounds: usize,
    max_tokens: usize,
) -> anyhow::Result<Vec<Level>> {
    let target = Arc::new(Target {
        url: stack.url("/v1/chat/completions"),
        token: Some(stack.client_token.clone()),
        model: DEMO_MODEL.into(),
    });
    eprintln!("warm-up: the first request through the queen spawns the worker ...");
    one_request(&load_client()?, &target, 0, max_tokens).await?;
    let mut out = Vec::new();
    for &c in levels {
        let mut level = drive(&target, c, rounds, max_tokens).await?;
        level.rss_mib = worker_rss_mib(stack).await?;
        eprintln!(
            "  rbee c={c}: {:.1} tok/s, TTFT p50 {:.0} ms",
            level.tps(),
            percentile(&level.ttft_ms, 50.0)
        );
        out.push(level);
    }
    Ok(out)
}

/// Peak RSS summed over the hive's workers.
async fn worker_rss_mib(stack: &Stack) -> anyhow::Result<f64> {
    let v: Value = reqwest::Client::new()
        .get(format!("{}/v1/workers", stack.hive_url))
        .bearer_auth(&stack.hive_token)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["pid"].as_i64())
        .filter_map(|pid| peak_rss_mib(pid as i32))
        .sum())
}

async fn run_llama(
    bin: &Path,
    model: &Path,
    threads: usize,
    levels: &[usize],
    rounds: usize,
    max_tokens: usize,
) -> anyhow::Result<Vec<Level>> {
    let mut out = Vec::new();
    for &c in levels {
        let port = free_port()?;
        // Each slot gets room for the prompt and the answer, as our worker's pool would.
        let ctx = c * 1024;
        let mut child = tokio::process::Command::new(bin)
            .args(["-m", &model.display().to_string()])
            .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
            .args(["-np", &c.to_string(), "-c", &ctx.to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let client = load_client()?;
        let t0 = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{base}/health")).send().await
                && r.status().is_success()
            {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("llama-server did not come up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let target = Arc::new(Target {
            url: format!("{base}/v1/chat/completions"),
            token: None,
            model: MODEL_FILE.into(),
        });
        one_request(&client, &target, 0, max_tokens).await?;
        let pid = child.id().context("llama-server pid")? as i32;
        let mut level = drive(&target, c, rounds, max_tokens).await?;
        level.rss_mib = peak_rss_mib(pid).unwrap_or(0.0);
        eprintln!(
            "  llama-server c={c}: {:.1} tok/s, TTFT p50 {:.0} ms",
            level.tps(),
            percentile(&level.ttft_ms, 50.0)
        );
        let _ = child.kill().await;
        out.push(level);
    }
    Ok(out)
}

/// A fresh connection per request for both servers alike: llama-server closes idle
/// keep-alive connections, which a pooled client then finds dead mid-send.
fn load_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `concurrency` clients, each sending `rounds` requests back to back.
async fn drive(
    target: &Arc<Target>,
    concurrency: usize,
    rounds: usize,
    max_tokens: usize,
) -> anyhow::Result<Level> {
    let client = load_client()?;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let (client, target) = (client.clone(), Arc::clone(target));
        tasks.spawn(async move {
            let mut samples = Vec::new();
            for r in 0..rounds {
                let n = 1 + i * rounds + r;
                samples.push(one_request(&client, &target, n, max_tokens).await);
            }
            samples
        });
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r?);
    }
    let mut level = Level {
        concurrency,
        wall_s: t0.elapsed().as_secs_f64(),
        ..Level::default()
    };
    for r in results.into_iter().flatten() {
        match r {
            Ok(s) => {
                level.tokens += s.tokens;
                level.ttft_ms.push(s.ttft_ms);
                level.itl_ms.extend(s.itl_ms);
            }
            Err(e) => {
                eprintln!("    request failed: {e:#}");
                level.failures += 1;
            }
        }
    }
    Ok(level)
}

struct Sample {
    tokens: u64,
    ttft_ms: f64,
    itl_ms: Vec<f64>,
}

async fn one_request(
    client: &reqwest::Client,
    target: &Target,
    n: usize,
    max_tokens: usize,
) -> anyhow::Result<Sample> {
    let body = json!({
        "model": target.model,
        "messages": [{"role": "user", "content": format!(
            "Request {n}. Write a long story about a beekeeper who finds a new hive in an old oak tree.")}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = client.post(&target.url).json(&body);
    if let Some(t) = &target.token {
        req = req.bearer_auth(t);
    }
    let t0 = Instant::now();
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("answered {status}: {}", resp.text().await?);
    }
    let mut reader = SseReader::new(resp);
    let mut first = None;
    let mut last: Option<Instant> = None;
    let mut itl = Vec::new();
    let mut tokens = None;
    while let Some(SseData::Event(v)) = reader.next().await? {
        if v.get("error").is_some() {
            bail!("error in the stream: {v}");
        }
        let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !content.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            if let Some(prev) = last {
                itl.push(now.duration_since(prev).as_secs_f64() * 1e3);
            }
            last = Some(now);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n);
        }
    }
    let first = first.context("no content in the stream")?;
    Ok(Sample {
        tokens: tokens.context("no usage chunk")?,
        ttft_ms: first.duration_since(t0).as_secs_f64() * 1e3,
        itl_ms: itl,
    })
}

fn print_report(
    ours: &[Level],
    theirs: Option<&[Level]>,
    rounds: usize,
    max_tokens: usize,
    threads: usize,
) {
    println!(
        "\n{MODEL_FILE}, streaming chat, {max_tokens} tokens max, {rounds} requests per client, \
         {threads} threads\n"
    );
    println!(
        "| clients | rbee tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | worker RSS MiB | failed |{}",
        if theirs.is_some() {
            " llama-server tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | RSS MiB | tok/s ratio | TTFT p50 ratio | RSS ratio |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|{}",
        if theirs.is_some() {
            "---|---|---|---|---|---|---|"
        } else {
            ""
        }
    );
    for (i, o) in ours.iter().enumerate() {
        let mut row = format!(
            "| {} | {:.1} | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} | {} |",
            o.concurrency,
            o.tps(),
            percentile(&o.ttft_ms, 50.0),
            percentile(&o.ttft_ms, 99.0),
            percentile(&o.itl_ms, 50.0),
            percentile(&o.itl_ms, 99.0),
            o.rss_mib,
            o.failures
        );
        if let Some(t) = theirs.and_then(|t| t.get(i)) {
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
            row.push_str(&format!(
                " {:.1} | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} | {:.2} | {:.2} | {:.2} |",
                t.tps(),
                percentile(&t.ttft_ms, 50.0),
                percentile(&t.ttft_ms, 99.0),
                percentile(&t.itl_ms, 50.0),
                percentile(&t.itl_ms, 99.0),
                t.rss_mib,
                ratio(o.tps(), t.tps()),
                ratio(percentile(&o.ttft_ms, 50.0), percentile(&t.ttft_ms, 50.0)),
                ratio(o.rss_mib, t.rss_mib),
            ));
        }
        println!("{row}");
    }
    println!(
        "\nratios are rbee / llama-server: tok/s above 1 is faster, TTFT and RSS below 1 are better"
    );
}
