//! The allowlists. Derived from `strace -f` of the binaries under the tests (tiny guests, the
//! lifecycle tests, the husk-vsock protocol and QEMU tests), keeping only what the run phase
//! needs: everything before the filter (opening /dev/kvm, creating the VM, binding sockets,
//! starting threads in husk-vmm) is left out.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

const KVMIO: u32 = 0xae;

/// `KVM_RUN`.
pub fn kvm_run() -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0)
}

/// `KVM_GET_REGS`.
pub fn kvm_get_regs() -> u64 {
    ioctl_expr(
        _IOC_READ,
        KVMIO,
        0x81,
        std::mem::size_of::<kvm_regs>() as u32,
    )
}

/// `KVM_GET_SREGS`.
pub fn kvm_get_sregs() -> u64 {
    ioctl_expr(
        _IOC_READ,
        KVMIO,
        0x83,
        std::mem::size_of::<kvm_sregs>() as u32,
    )
}

/// `KVM_SET_REGS` (completing an `int3` the emulator could not run).
pub fn kvm_set_regs() -> u64 {
    ioctl_expr(
        _IOC_WRITE,
        KVMIO,
        0x82,
        std::mem::size_of::<kvm_regs>() as u32,
    )
}

/// `KVM_GET_VCPU_EVENTS`.
pub fn kvm_get_vcpu_events() -> u64 {
    ioctl_expr(
        _IOC_READ,
        KVMIO,
        0x9f,
        std::mem::size_of::<kvm_vcpu_events>() as u32,
    )
}

/// `KVM_SET_VCPU_EVENTS` (injecting the #BP of that `int3`).
pub fn kvm_set_vcpu_events() -> u64 {
    ioctl_expr(
        _IOC_WRITE,
        KVMIO,
        0xa0,
        std::mem::size_of::<kvm_vcpu_events>() as u32,
    )
}

fn cond(arg: u8, op: Op, value: u64) -> SeccompCondition {
    // Argument indices are 0..=5 and the operators are valid: `new` cannot fail here.
    SeccompCondition::new(arg, Len::Dword, op, value).expect("valid seccomp condition")
}

/// A rule matching when argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|v| SeccompRule::new(vec![cond(arg, Op::Eq, *v)]).expect("non-empty rule"))
        .collect()
}

/// One rule per `(option, value)` pair: `arg 1 == option` and `arg 2 == value`.
fn args12(pairs: &[(u64, u64)]) -> Vec<SeccompRule> {
    pairs
        .iter()
        .map(|(a, b)| {
            SeccompRule::new(vec![cond(1, Op::Eq, *a), cond(2, Op::Eq, *b)])
                .expect("non-empty rule")
        })
        .collect()
}

/// A rule matching when `arg & mask == 0`.
fn arg_clear(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![SeccompRule::new(vec![cond(arg, Op::MaskedEq(mask), 0)]).expect("non-empty rule")]
}

/// A rule matching when `arg & mask == mask`.
fn arg_set(arg: u8, mask: u64) -> Vec<SeccompRule> {
    vec![SeccompRule::new(vec![cond(arg, Op::MaskedEq(mask), mask)]).expect("non-empty rule")]
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for nr in calls {
        rules.insert(*nr, vec![]);
    }
}

/// What both binaries need once running: I/O on fds they already have or accept, epoll and
/// poll, memory management without executable mappings, futexes and sleeps, signal plumbing,
/// Unix sockets, clean exit (unlinking their socket files).
fn common() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_close,
            libc::SYS_shutdown,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_getsockopt,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_getrandom,
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            // The rest of a thread's start-up, for threads created just before the filter (a
            // device's thread made when the VM is built may still be starting when TSYNC
            // reaches it). Creating threads stays forbidden in husk-vmm.
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_sched_getaffinity,
        ],
    );
    r.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64]));
    let no_exec = libc::PROT_EXEC as u64;
    r.insert(libc::SYS_mmap, arg_clear(2, no_exec));
    r.insert(libc::SYS_mprotect, arg_clear(2, no_exec));
    r.insert(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64]));
    r.insert(
        libc::SYS_fcntl,
        arg_in(
            1,
            &[
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        ),
    );
    // Socket timeouts (the API socket's answers).
    let sol = libc::SOL_SOCKET as u64;
    r.insert(
        libc::SYS_setsockopt,
        args12(&[
            (sol, libc::SO_SNDTIMEO as u64),
            (sol, libc::SO_RCVTIMEO as u64),
        ]),
    );
    // A panic under `panic = "abort"` raises SIGABRT (after resetting its handler).
    r.insert(libc::SYS_rt_sigaction, arg_in(0, &[libc::SIGABRT as u64]));
    r
}

/// husk-vmm: vCPU threads (`KVM_RUN`, the register reads of an emulation-failure report, the
/// register and event writes that complete an unemulated `int3`,
/// device work on MMIO exits), the event loop (eventfds, signalfd, vsock muxer, API socket,
/// kicking vCPUs with SIGRTMIN), and teardown.
pub fn vmm_rules() -> Rules {
    let mut r = common();
    r.insert(
        libc::SYS_ioctl,
        arg_in(
            1,
            &[
                kvm_run(),
                kvm_get_regs(),
                kvm_get_sregs(),
                kvm_set_regs(),
                kvm_get_vcpu_events(),
                kvm_set_vcpu_events(),
                libc::FIONBIO,
            ],
        ),
    );
    r.insert(
        libc::SYS_tgkill,
        arg_in(
            2,
            &[
                vmm_sys_util::signal::SIGRTMIN() as u64,
                libc::SIGABRT as u64,
            ],
        ),
    );
    // virtio-fs: at DRIVER_OK and reset the vCPU thread talks vhost-user to virtiofsd; requests
    // carry fds (SET_MEM_TABLE, SET_VRING_KICK/CALL) and replies are read with recvmsg.
    allow(&mut r, &[libc::SYS_sendmsg, libc::SYS_recvmsg]);
    allow(&mut r, &DENIED_OPENS);
    r
}

/// File opens that libraries attempt on their own at run time (glibc's
/// malloc counting CPUs for a new arena, Rust's `available_parallelism`
/// reading cgroup files): the allowlists let them through to a stacked
/// filter that fails them with EACCES, so they fall back instead of the
/// process being killed, and nothing is ever opened.
pub const DENIED_OPENS: [i64; 3] = [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// husk-vsock: the vhost-user session (messages with fds, mapping guest memory shared),
/// the vring and muxer thread, threads started by the vhost-user daemon, and the signal thread.
pub fn vsock_rules() -> Rules {
    let mut r = common();
    allow(
        &mut r,
        &[
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_rt_sigtimedwait,
            // Allowed here so that the stacked ENOSYS filter decides (see the module docs).
            libc::SYS_clone3,
        ],
    );
    r.insert(libc::SYS_clone, arg_set(0, libc::CLONE_THREAD as u64));
    r.insert(libc::SYS_ioctl, arg_in(1, &[libc::FIONBIO]));
    r.insert(libc::SYS_tgkill, arg_in(2, &[libc::SIGABRT as u64]));
    allow(&mut r, &DENIED_OPENS);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers() {
        assert_eq!(kvm_run(), 0xae80);
        assert_eq!(kvm_get_regs(), 0x8090_ae81);
        assert_eq!(kvm_get_sregs(), 0x8138_ae83);
    }

    #[test]
    fn nothing_that_starts_programs_or_opens_files_is_allowed() {
        for rules in [vmm_rules(), vsock_rules()] {
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_bind,
                libc::SYS_mount,
                libc::SYS_memfd_create,
            ] {
                assert!(!rules.contains_key(&nr), "syscall {nr} must not be allowed");
            }
        }
        // Opens pass the allowlists only to meet the stacked EACCES filter.
        for rules in [vmm_rules(), vsock_rules()] {
            for nr in DENIED_OPENS {
                assert!(rules.contains_key(&nr));
            }
        }
        assert!(!vmm_rules().contains_key(&libc::SYS_clone));
        assert!(!vmm_rules().contains_key(&libc::SYS_clone3));
    }
}
