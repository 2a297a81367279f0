//! The sandbox owner thread.
//!
//! husk-runtime spawns the VMM and its helpers with `PR_SET_PDEATHSIG`,
//! which fires when the *thread* that spawned them exits. ttrpc handler
//! threads come and go, so sandboxes are started here, on one thread that
//! lives as long as the shim.

use std::sync::{mpsc, Mutex};

use husk_runtime::host::HostProbe;
use husk_runtime::{RuntimeConfig, Sandbox};

use crate::error::{Result, ShimError};

type Request = (
    RuntimeConfig,
    String,
    mpsc::Sender<husk_runtime::Result<Sandbox>>,
);

/// Handle to the thread that starts (and so owns) sandbox VMs.
#[derive(Debug)]
pub struct SandboxOwner {
    tx: Mutex<mpsc::Sender<Request>>,
}

impl SandboxOwner {
    /// Starts the owner thread. It lives until this handle is dropped.
    pub fn spawn() -> Result<SandboxOwner> {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("sandbox-owner".into())
            .spawn(move || {
                let host = HostProbe::detect();
                for (cfg, id, reply) in rx {
                    let _ = reply.send(Sandbox::start(&cfg, &host, &id));
                }
            })
            .map_err(|e| ShimError::io("starting the sandbox owner thread", e))?;
        Ok(SandboxOwner { tx: Mutex::new(tx) })
    }

    /// Starts sandbox `id` on the owner thread and waits for it.
    pub fn start(&self, cfg: RuntimeConfig, id: &str) -> Result<Sandbox> {
        let (reply, rx) = mpsc::channel();
        let gone = || {
            ShimError::io(
                "sandbox owner thread",
                std::io::ErrorKind::BrokenPipe.into(),
            )
        };
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((cfg, id.to_string(), reply))
            .map_err(|_| gone())?;
        Ok(rx.recv().map_err(|_| gone())??)
    }
}
