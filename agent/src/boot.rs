//! Boot-stage timestamps: when the agent reached each step of bringing the
//! guest up, on CLOCK_BOOTTIME (nanoseconds since the guest kernel started),
//! so the host can split "VM boot" into kernel time and agent time.

use std::sync::Mutex;

use nix::time::{clock_gettime, ClockId};

/// An ordered record of boot stages, shared between init and the API.
#[derive(Debug, Default)]
pub struct BootStages {
    stages: Mutex<Vec<(String, u64)>>,
}

impl BootStages {
    /// Stamps `name` with the current boot time.
    pub fn mark(&self, name: &str) {
        let now = boottime_ns();
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), now));
    }

    /// The stages recorded so far, in order.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// CLOCK_BOOTTIME in nanoseconds (0 if the clock cannot be read).
pub fn boottime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_keep_order_and_grow_monotonically() {
        let s = BootStages::default();
        s.mark("a");
        s.mark("b");
        let v = s.snapshot();
        assert_eq!(
            v.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(v[0].1 > 0);
        assert!(v[1].1 >= v[0].1);
    }
}
