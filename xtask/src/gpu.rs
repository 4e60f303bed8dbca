//! `cargo xtask check-gpu`: builds the CUDA worker (`--features cuda`) on a machine with no GPU
//! and no CUDA install, so that the GPU build is something that compiles, not a flag.
//!
//! The toolkit comes from PyPI: NVIDIA publishes `nvcc` itself only in the CUDA 13 wheels
//! (`nvidia-cuda-nvcc`; the `-cu12` wheels carry `ptxas` alone), with the runtime, cuBLAS,
//! cuRAND and CCCL headers beside it. They go into `<target>/cuda-toolkit`, once. An `nvcc`
//! already on `PATH` (a real CUDA install) is used instead. There is no GPU to ask for its
//! compute capability, so `CUDA_COMPUTE_CAP` defaults to 80 (kernels for sm_80 and newer).
//!
//! candle links the CUDA libraries dynamically. The wheels hold only versioned files
//! (`libcudart.so.13`) and no driver, so `lib/stubs` gets the unversioned links the linker
//! looks for and a stub `libcuda.so` (soname `libcuda.so.1`) defining every driver function
//! cudarc declares, each returning `CUDA_ERROR_UNKNOWN`. A real host loads its driver's
//! `libcuda.so.1` instead; here the stub lets the built worker start and fail at device
//! initialisation with the driver's error, which is the check that it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::cargo::{cargo, target_dir, workspace_root};

/// The PyPI wheels that make a CUDA 13 toolkit (`nvidia/cu13/{bin,include,lib}`). The
/// compiler's parts are pinned to one release, the newest cudarc 0.19 knows (its build script
/// refuses others; and a newer `nvvm` writes PTX the pinned `ptxas` cannot read).
const TOOLKIT_WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.4.92",
    "nvidia-nvvm==13.4.92",
    "nvidia-cuda-crt==13.4.92",
    "nvidia-cuda-nvrtc==13.4.92",
    "nvidia-cuda-runtime==13.4.92",
    "nvidia-cuda-cccl",
    "nvidia-cublas",
    "nvidia-curand",
];

fn nvcc_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

/// A CUDA toolkit root (`bin/nvcc`, `include/`): the one on `PATH`, else the PyPI one,
/// installed on first use.
fn toolkit() -> anyhow::Result<PathBuf> {
    if let Some(nvcc) = nvcc_on_path() {
        let root = nvcc
            .parent()
            .and_then(Path::parent)
            .context("nvcc has no parent directory")?;
        eprintln!("using the CUDA toolkit at {}", root.display());
        return Ok(root.to_path_buf());
    }
    let dir = target_dir().join("cuda-toolkit");
    let root = dir.join("nvidia").join("cu13");
    if root.join("bin").join("nvcc").is_file() && root.join("include").join("nv").is_dir() {
        return Ok(root);
    }
    eprintln!(
        "installing a CUDA toolkit from PyPI into {} ({}) ...",
        dir.display(),
        TOOLKIT_WHEELS.join(", ")
    );
    let _ = std::fs::remove_dir_all(&dir);
    // One pip call: `--target` replaces the `nvidia/` folder on every call.
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .args(TOOLKIT_WHEELS)
        .status()
        .context("running pip (python3 with pip is needed)")?;
    if !status.success() || !root.join("bin").join("nvcc").is_file() {
        bail!("installing the CUDA toolkit wheels failed ({status})");
    }
    Ok(root)
}

/// `lib/stubs` of a PyPI toolkit: unversioned links to its libraries and a stub driver.
/// Returns the directory.
fn link_stubs(root: &Path) -> anyhow::Result<PathBuf> {
    let lib = root.join("lib");
    let stubs = lib.join("stubs");
    std::fs::create_dir_all(&stubs)?;
    for entry in std::fs::read_dir(&lib)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // libcudart.so.13 -> stubs/libcudart.so
        if let Some((base, version)) = name.split_once(".so.")
            && !version.contains('.')
        {
            let link = stubs.join(format!("{base}.so"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&name), &link)?;
        }
    }
    let driver = stubs.join("libcuda.so");
    if !driver.is_file() {
        let symbols = driver_symbols()?;
        let c: String = symbols
            .iter()
            .map(|s| format!("int {s}(void) {{ return 999; }}\n"))
            .collect();
        let src = stubs.join("cuda_stub.c");
        std::fs::write(&src, c)?;
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
            .arg(&driver)
            .arg(&src)
            .status()
            .context("running cc (a C compiler is needed for the stub driver)")?;
        if !status.success() {
            bail!("compiling the stub libcuda.so failed");
        }
        eprintln!(
            "stub driver with {} functions: {}",
            symbols.len(),
            driver.display()
        );
    }
    Ok(stubs)
}

/// The driver functions cudarc calls, from its own bindings (found with `cargo metadata`).
fn driver_symbols() -> anyhow::Result<Vec<String>> {
    let out = Command::new(cargo())
        .current_dir(workspace_root())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--all-features",
        ])
        .output()
        .context("running cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata")?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph")?;
    let bindings = Path::new(manifest)
        .parent()
        .context("cudarc's manifest has no directory")?
        .join("src/driver/sys/mod.rs");
    let text = std::fs::read_to_string(&bindings)
        .with_context(|| format!("reading {}", bindings.display()))?;
    // Declarations inside `extern "C"` blocks: `        fn cuInit(flags: ...) -> CUresult;`
    let mut symbols: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("fn cu"))
        .filter_map(|rest| rest.split('(').next())
        .map(|name| format!("cu{name}"))
        .collect();
    symbols.sort();
    symbols.dedup();
    if symbols.is_empty() {
        bail!("no driver functions found in {}", bindings.display());
    }
    Ok(symbols)
}

/// Whether this machine has an NVIDIA driver library.
fn has_driver() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so.1"))
}

pub fn check_gpu() -> anyhow::Result<()> {
    let root = toolkit()?;
    // Only the PyPI toolkit lacks the links and the driver; a real install is left untouched.
    let stubs = if root.starts_with(target_dir().join("cuda-toolkit")) {
        Some(link_stubs(&root)?)
    } else {
        None
    };
    let bin = root.join("bin");
    let path = std::env::join_paths(
        std::iter::once(bin.clone()).chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
    )?;
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // Its own target directory: the CUDA build's candle differs from the CPU one, and its
    // worker binary must not replace the one the tests run.
    let out = target_dir().join("cuda");
    eprintln!(
        "building llm-worker-rbee --features cuda (release, CUDA_COMPUTE_CAP={cap}) into {} ...",
        out.display()
    );
    let status = Command::new(cargo())
        .current_dir(workspace_root())
        .env("PATH", &path)
        .env("CUDA_HOME", &root)
        .env("CUDA_PATH", &root)
        .env("CUDA_COMPUTE_CAP", &cap)
        // A changed value makes cudarc's build script look for the libraries again.
        .env("CUDA_ROOT", &root)
        .args(["build", "--release", "--locked", "-p", "llm-worker-rbee"])
        .args(["--features", "cuda", "--target-dir"])
        .arg(&out)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("the CUDA worker does not build");
    }
    let worker = out.join("release").join("llm-worker-rbee");
    println!("CUDA worker built: {}", worker.display());
    // The check that it links and starts: with no GPU (or driver) it must say so and exit;
    // on a GPU host it loads a tiny model and serves (stopped after a few seconds).
    let log = out.join("check-gpu-worker.log");
    let mut run = Command::new(&worker);
    if let Some(stubs) = stubs.as_ref().filter(|_| !has_driver()) {
        // The stub driver under the name the binary asks for, then the toolkit's libraries.
        let runtime = out.join("stub-driver");
        std::fs::create_dir_all(&runtime)?;
        let link = runtime.join("libcuda.so.1");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(stubs.join("libcuda.so"), &link)?;
        run.env(
            "LD_LIBRARY_PATH",
            std::env::join_paths([runtime, root.join("lib")])?,
        );
    }
    let mut child = run
        .args(["--device", "cuda", "--listen", "127.0.0.1:0", "--model"])
        .arg(workspace_root().join("test-harness/testdata/arch/llama-tiny-q8_0.gguf"))
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(out.join("check-gpu-worker.err"))?)
        .spawn()
        .with_context(|| format!("running {}", worker.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(out.join("check-gpu-worker.err")).unwrap_or_default();
    if output.contains("not been built with cuda") {
        bail!("{} was built without CUDA:\n{output}", worker.display());
    }
    match status {
        None => {
            println!("started with --device cuda: loaded the model and served (stopped after 20 s)")
        }
        Some(status) => {
            let reason = output
                .lines()
                .find(|l| l.contains("fatal"))
                .unwrap_or("(no fatal line)");
            println!("started with --device cuda: {status} (no usable GPU here)\n  {reason}");
        }
    }
    Ok(())
}
