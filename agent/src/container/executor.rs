//! The last step before a container process execs: restore default signal
//! dispositions. The agent is a Rust program, and Rust ignores SIGPIPE; an
//! ignored signal survives exec(2), so without this every container
//! process would ignore SIGPIPE (`seq | head` would end in "write error"
//! instead of a quiet SIGPIPE death). runc resets them the same way.

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

/// libcontainer's default executor, with signal dispositions reset first.
#[derive(Debug, Clone, Default)]
pub struct AgentExecutor;

/// Sets every catchable signal to its default action and unblocks all.
pub fn reset_signals() {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no handler code to be unsafe; we
        // are single-threaded in the container's init just before exec.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

impl Executor for AgentExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        reset_signals();
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
