//! What happens on a forbidden system call: the filter returns `SECCOMP_RET_TRAP`, so the call
//! does not run and the kernel sends SIGSYS to the calling thread (even if it blocks SIGSYS).
//! The handler writes one line to stderr and ends the process with
//! [`super::EXIT_SECCOMP_VIOLATION`]:
//!
//! ```text
//! husk-vmm: seccomp: thread 4242 made the forbidden system call socket (41); exiting with status 5
//! ```
//!
//! It only formats into a stack buffer and calls `write(2)` and `_exit(2)`, both allowed by
//! every filter and async-signal-safe.

use std::sync::OnceLock;

use super::EXIT_SECCOMP_VIOLATION;

static PROGRAM: OnceLock<&'static str> = OnceLock::new();

/// The SIGSYS fields of `siginfo_t` on x86_64 (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// `si_code` of a seccomp trap.
const SYS_SECCOMP: i32 = 1;

/// Install the handler; `program` names the binary in the message.
pub fn install_handler(program: &'static str) -> std::io::Result<()> {
    let _ = PROGRAM.set(program);
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; SigsysInfo is the
    // prefix of its layout for SIGSYS on x86_64 and has no invalid bit patterns.
    let si = unsafe { &*(info as *const SigsysInfo) };
    let mut msg = Message::default();
    msg.push(PROGRAM.get().copied().unwrap_or("husk"));
    if si.code == SYS_SECCOMP {
        msg.push(": seccomp: thread ");
        // SAFETY: gettid(2) has no arguments and cannot fail.
        msg.push_num(i64::from(unsafe { libc::gettid() }));
        msg.push(" made the forbidden system call ");
        msg.push(syscall_name(i64::from(si.syscall)).unwrap_or("?"));
        msg.push(" (");
        msg.push_num(i64::from(si.syscall));
        msg.push(")");
    } else {
        msg.push(": SIGSYS not raised by seccomp");
    }
    msg.push("; exiting with status ");
    msg.push_num(i64::from(EXIT_SECCOMP_VIOLATION));
    msg.push("\n");
    // SAFETY: write(2) of our own stack buffer, then _exit(2): both async-signal-safe.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_SECCOMP_VIOLATION);
    }
}

/// A fixed buffer, filled without allocating.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, s: &str) {
        for b in s.bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push("-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for d in &digits[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = *d;
                self.len += 1;
            }
        }
    }
}

macro_rules! table {
    ($($name:ident = $sys:ident),+ $(,)?) => { [$((libc::$sys, stringify!($name))),+] };
}

/// Names of the commonest x86_64 system calls, for the message.
static NAMES: &[(i64, &str)] = &table!(
    read = SYS_read,
    write = SYS_write,
    open = SYS_open,
    close = SYS_close,
    stat = SYS_stat,
    fstat = SYS_fstat,
    lstat = SYS_lstat,
    poll = SYS_poll,
    lseek = SYS_lseek,
    mmap = SYS_mmap,
    mprotect = SYS_mprotect,
    munmap = SYS_munmap,
    brk = SYS_brk,
    rt_sigaction = SYS_rt_sigaction,
    rt_sigprocmask = SYS_rt_sigprocmask,
    ioctl = SYS_ioctl,
    pread64 = SYS_pread64,
    pwrite64 = SYS_pwrite64,
    readv = SYS_readv,
    writev = SYS_writev,
    access = SYS_access,
    pipe = SYS_pipe,
    select = SYS_select,
    mremap = SYS_mremap,
    madvise = SYS_madvise,
    dup = SYS_dup,
    dup2 = SYS_dup2,
    nanosleep = SYS_nanosleep,
    getpid = SYS_getpid,
    sendfile = SYS_sendfile,
    socket = SYS_socket,
    connect = SYS_connect,
    accept = SYS_accept,
    sendto = SYS_sendto,
    recvfrom = SYS_recvfrom,
    sendmsg = SYS_sendmsg,
    recvmsg = SYS_recvmsg,
    shutdown = SYS_shutdown,
    bind = SYS_bind,
    listen = SYS_listen,
    getsockname = SYS_getsockname,
    getpeername = SYS_getpeername,
    socketpair = SYS_socketpair,
    setsockopt = SYS_setsockopt,
    getsockopt = SYS_getsockopt,
    clone = SYS_clone,
    fork = SYS_fork,
    vfork = SYS_vfork,
    execve = SYS_execve,
    exit = SYS_exit,
    wait4 = SYS_wait4,
    kill = SYS_kill,
    uname = SYS_uname,
    fcntl = SYS_fcntl,
    flock = SYS_flock,
    fsync = SYS_fsync,
    ftruncate = SYS_ftruncate,
    getcwd = SYS_getcwd,
    chdir = SYS_chdir,
    rename = SYS_rename,
    mkdir = SYS_mkdir,
    rmdir = SYS_rmdir,
    unlink = SYS_unlink,
    symlink = SYS_symlink,
    readlink = SYS_readlink,
    chmod = SYS_chmod,
    chown = SYS_chown,
    umask = SYS_umask,
    getrlimit = SYS_getrlimit,
    getuid = SYS_getuid,
    getgid = SYS_getgid,
    setuid = SYS_setuid,
    setgid = SYS_setgid,
    geteuid = SYS_geteuid,
    getppid = SYS_getppid,
    setsid = SYS_setsid,
    sigaltstack = SYS_sigaltstack,
    prctl = SYS_prctl,
    arch_prctl = SYS_arch_prctl,
    mount = SYS_mount,
    umount2 = SYS_umount2,
    ptrace = SYS_ptrace,
    gettid = SYS_gettid,
    tkill = SYS_tkill,
    futex = SYS_futex,
    sched_getaffinity = SYS_sched_getaffinity,
    epoll_create = SYS_epoll_create,
    getdents64 = SYS_getdents64,
    set_tid_address = SYS_set_tid_address,
    restart_syscall = SYS_restart_syscall,
    clock_gettime = SYS_clock_gettime,
    clock_nanosleep = SYS_clock_nanosleep,
    exit_group = SYS_exit_group,
    epoll_wait = SYS_epoll_wait,
    epoll_ctl = SYS_epoll_ctl,
    tgkill = SYS_tgkill,
    openat = SYS_openat,
    mkdirat = SYS_mkdirat,
    newfstatat = SYS_newfstatat,
    unlinkat = SYS_unlinkat,
    renameat = SYS_renameat,
    ppoll = SYS_ppoll,
    set_robust_list = SYS_set_robust_list,
    splice = SYS_splice,
    epoll_pwait = SYS_epoll_pwait,
    signalfd4 = SYS_signalfd4,
    timerfd_create = SYS_timerfd_create,
    timerfd_settime = SYS_timerfd_settime,
    timerfd_gettime = SYS_timerfd_gettime,
    eventfd2 = SYS_eventfd2,
    epoll_create1 = SYS_epoll_create1,
    dup3 = SYS_dup3,
    pipe2 = SYS_pipe2,
    accept4 = SYS_accept4,
    prlimit64 = SYS_prlimit64,
    sched_yield = SYS_sched_yield,
    getrandom = SYS_getrandom,
    memfd_create = SYS_memfd_create,
    execveat = SYS_execveat,
    statx = SYS_statx,
    rseq = SYS_rseq,
    clone3 = SYS_clone3,
    rt_sigreturn = SYS_rt_sigreturn,
    rt_sigtimedwait = SYS_rt_sigtimedwait,
    seccomp = SYS_seccomp,
    pidfd_open = SYS_pidfd_open,
    io_uring_setup = SYS_io_uring_setup,
    openat2 = SYS_openat2,
    mlock = SYS_mlock,
    process_vm_readv = SYS_process_vm_readv,
    process_vm_writev = SYS_process_vm_writev,
);

/// The name of system call `nr`, for the commonest ones.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_format() {
        assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(100_000), None);
        let mut m = Message::default();
        m.push("x=");
        m.push_num(0);
        m.push(",");
        m.push_num(-41);
        m.push(",");
        m.push_num(1234567);
        assert_eq!(&m.buf[..m.len], b"x=0,-41,1234567");
    }
}
