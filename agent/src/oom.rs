//! OOM-kill events: a thread watches each container's `memory.events`
//! (`oom_kill` count) and queues the container id when it grows;
//! `GetOomEvent` takes them in order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::container::{cgroup, Manager};

/// How often the watcher looks at the counters.
const POLL: Duration = Duration::from_millis(200);

/// Queued OOM events.
#[derive(Debug, Default)]
pub struct OomEvents {
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
}

impl OomEvents {
    /// Queues an event for `id`.
    pub fn push(&self, id: String) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(id);
        self.ready.notify_all();
    }

    /// Blocks until an event is queued and returns its container id.
    pub fn next(&self) -> String {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(id) = q.pop_front() {
                return id;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Starts the watcher thread.
pub fn spawn_watcher(manager: Arc<Manager>, events: Arc<OomEvents>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("oom-watch".into())
        .spawn(move || {
            let mut seen: HashMap<String, u64> = HashMap::new();
            loop {
                let live = manager.cgroups();
                seen.retain(|id, _| live.iter().any(|(l, _)| l == id));
                for (id, dir) in live {
                    let n = cgroup::oom_kills(&dir);
                    let before = seen.insert(id.clone(), n).unwrap_or(0);
                    if n > before {
                        tracing::info!(container = %id, "OOM kill");
                        events.push(id);
                    }
                }
                std::thread::sleep(POLL);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_order() {
        let e = OomEvents::default();
        e.push("a".into());
        e.push("b".into());
        assert_eq!(e.next(), "a");
        assert_eq!(e.next(), "b");
    }
}
