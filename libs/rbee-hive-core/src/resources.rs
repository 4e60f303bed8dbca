//! What this node has: cores, RAM, GPUs with VRAM, disk where models land.

use std::path::Path;
use std::time::Duration;

use rbee_api::{GpuInfo, NodeResources};
use tracing::debug;

/// Reads the node's resources now. GPU discovery runs `nvidia-smi` (bounded to 5 s) when it
/// is on PATH; on macOS the Metal GPU shares system memory.
pub async fn snapshot(model_dir: &Path) -> NodeResources {
    let (memory_total_bytes, memory_available_bytes) = memory();
    NodeResources {
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_total_bytes,
        memory_available_bytes,
        gpus: gpus(memory_total_bytes, memory_available_bytes).await,
        model_disk_free_bytes: rbee_models::free_space(model_dir).unwrap_or(0),
    }
}

/// (total, available) RAM in bytes.
#[cfg(target_os = "linux")]
pub fn memory() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(target_os = "macos")]
pub fn memory() -> (u64, u64) {
    let mut total: u64 = 0;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: sysctlbyname writes at most `len` bytes into `total`; the name is NUL-terminated.
    let rc = unsafe {
        libc::sysctlbyname(
            c"hw.memsize".as_ptr(),
            (&mut total as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return (0, 0);
    }
    // macOS has no MemAvailable; half of RAM is a conservative stand-in.
    (total, total / 2)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn memory() -> (u64, u64) {
    (0, 0)
}

/// Resident memory of a process in bytes (Linux: /proc/<pid>/status VmRSS).
pub fn process_rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

async fn gpus(_mem_total: u64, _mem_available: u64) -> Vec<GpuInfo> {
    #[cfg(target_os = "macos")]
    {
        return vec![GpuInfo {
            device: "metal:0".into(),
            name: "Apple GPU (unified memory)".into(),
            vram_total_bytes: _mem_total,
            vram_free_bytes: _mem_available,
        }];
    }
    #[allow(unreachable_code)]
    nvidia_gpus().await
}

/// GPUs from `nvidia-smi`; none when it is missing or fails.
async fn nvidia_gpus() -> Vec<GpuInfo> {
    nvidia_smi(&[
        "--query-gpu=index,name,memory.total,memory.free",
        "--format=csv,noheader,nounits",
    ])
    .await
    .map(|out| parse_nvidia_smi(&out))
    .unwrap_or_default()
}

/// VRAM used per process (pid → bytes) from `nvidia-smi`; empty without NVIDIA GPUs.
pub async fn gpu_process_memory() -> std::collections::HashMap<u32, u64> {
    nvidia_smi(&[
        "--query-compute-apps=pid,used_memory",
        "--format=csv,noheader,nounits",
    ])
    .await
    .map(|out| parse_compute_apps(&out))
    .unwrap_or_default()
}

/// Runs `nvidia-smi` with `args` (bounded to 5 s); None when it is missing or fails.
async fn nvidia_smi(args: &[&str]) -> Option<String> {
    let run = tokio::process::Command::new("nvidia-smi")
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(o)) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(Ok(o)) => {
            debug!(status = %o.status, "nvidia-smi failed");
            None
        }
        Ok(Err(_)) => None, // not installed
        Err(_) => {
            debug!("nvidia-smi timed out");
            None
        }
    }
}

/// Parses `pid, used MiB` lines (a process on several GPUs appears once per GPU).
pub fn parse_compute_apps(text: &str) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        let mut f = line.split(',').map(str::trim);
        if let (Some(Ok(pid)), Some(Ok(mib))) = (
            f.next().map(str::parse::<u32>),
            f.next().map(str::parse::<u64>),
        ) {
            *out.entry(pid).or_insert(0) += mib * 1024 * 1024;
        }
    }
    out
}

/// Parses `index, name, total MiB, free MiB` lines.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, name, total, free] = f.as_slice() else {
                return None;
            };
            let mib = |s: &str| s.parse::<u64>().ok().map(|v| v * 1024 * 1024);
            Some(GpuInfo {
                device: format!("cuda:{}", index.parse::<u32>().ok()?),
                name: (*name).to_owned(),
                vram_total_bytes: mib(total)?,
                vram_free_bytes: mib(free)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_parse() {
        let g = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 80000\n1, X, bad, 1\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].device, "cuda:0");
        assert_eq!(g[0].vram_total_bytes, 81559 * 1024 * 1024);
        assert_eq!(g[0].vram_free_bytes, 80000 * 1024 * 1024);
    }

    #[test]
    fn compute_apps_sum_per_pid() {
        let m = parse_compute_apps("123, 1000\n123, 24\n456, [N/A]\n789, 2\n");
        assert_eq!(m.get(&123), Some(&(1024 * 1024 * 1024)));
        assert_eq!(m.get(&789), Some(&(2 * 1024 * 1024)));
        assert!(!m.contains_key(&456));
    }

    #[test]
    fn this_machine_has_memory_and_our_rss_is_visible() {
        let (total, avail) = memory();
        assert!(total > 0 && avail > 0 && avail <= total);
        assert!(process_rss(std::process::id()).is_some_and(|r| r > 0));
    }
}
