//! The worker ports this hive has handed out, so two workers never get the same one.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
pub struct Ports {
    used: Mutex<BTreeSet<u16>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port held for one worker process; dropping it gives the port back.
pub struct PortLease {
    port: u16,
    ports: Arc<Ports>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        lock(&self.ports.used).remove(&self.port);
    }
}

impl Ports {
    /// A free port from `range`: not handed out already and bindable now.
    pub fn reserve(self: &Arc<Self>, range: RangeInclusive<u16>) -> Result<PortLease, String> {
        let mut used = lock(&self.used);
        let (min, max) = (*range.start(), *range.end());
        for port in range {
            if used.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                used.insert(port);
                return Ok(PortLease {
                    port,
                    ports: self.clone(),
                });
            }
        }
        Err(format!(
            "no free port in workers.port_min..=port_max ({min}..={max})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_handed_out_once_until_its_lease_is_dropped() {
        let ports = Arc::new(Ports::default());
        let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let p = probe.local_addr().unwrap().port();
        drop(probe);
        let lease = ports.reserve(p..=p).unwrap();
        assert_eq!(lease.port(), p);
        assert!(ports.reserve(p..=p).is_err(), "held");
        drop(lease);
        assert!(ports.reserve(p..=p).is_ok(), "given back");
    }
}
