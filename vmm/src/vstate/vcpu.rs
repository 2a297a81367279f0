//! A vCPU and its run loop. Each vCPU runs on its own thread; port I/O and MMIO exits go to the
//! buses, and the exits that end the VM (shutdown, reset, halt without an irqchip, emulation
//! failure, entry failure) end the loop with a [`VcpuStop`] saying why.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::vm::Vm;
use super::{kvm_err, Result};
use crate::arch::x86_64::paging::{translate, PagingMode};
use crate::arch::x86_64::regs::{
    setup_cpuid, setup_fpu, setup_lint, setup_msrs, setup_regs, setup_sregs, EntryPoint,
};
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMem;

/// What the run loop of a vCPU needs.
#[derive(Clone)]
pub struct VcpuContext {
    /// The port-I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// Guest memory (to read instruction bytes on failures).
    pub mem: Arc<GuestMem>,
    /// Set by the VMM to stop every vCPU; the VMM also signals the threads to leave `KVM_RUN`.
    pub stop: Arc<AtomicBool>,
}

/// Details of a `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalError {
    /// vCPU index.
    pub vcpu: u8,
    /// KVM's suberror (1 = emulation failure).
    pub suberror: u32,
    /// KVM's extra data words.
    pub data: Vec<u64>,
    /// Guest RIP (linear, with the CS base added).
    pub rip: u64,
    /// The guest physical address of RIP, if the page tables map it.
    pub rip_phys: Option<u64>,
    /// Instruction bytes at RIP (from KVM, or read from guest memory).
    pub insn: Vec<u8>,
}

/// The #BP exception vector.
const BREAKPOINT_VECTOR: u8 = 3;

impl InternalError {
    /// Whether this is KVM's emulator failing on `int3` (opcode 0xcc), which the VMM completes
    /// by delivering #BP itself.
    pub fn is_unemulated_int3(&self) -> bool {
        self.suberror == KVM_INTERNAL_ERROR_EMULATION && self.insn.first() == Some(&0xcc)
    }
}

impl fmt::Display for InternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        write!(
            f,
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {} ({kind}) at RIP {:#x}",
            self.vcpu, self.suberror, self.rip
        )?;
        match self.rip_phys {
            Some(p) => write!(f, " (guest physical {p:#x})")?,
            None => write!(f, " (not mapped by the guest page tables)")?,
        }
        let bytes: Vec<String> = self.insn.iter().map(|b| format!("{b:02x}")).collect();
        if bytes.is_empty() {
            write!(f, "; instruction bytes: unavailable")?;
        } else {
            write!(f, "; instruction bytes: {}", bytes.join(" "))?;
        }
        if !self.data.is_empty() {
            let d: Vec<String> = self.data.iter().map(|x| format!("{x:#x}")).collect();
            write!(f, "; data: [{}]", d.join(", "))?;
        }
        Ok(())
    }
}

/// Why a vCPU loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VMM asked it to stop.
    Stopped,
    /// `KVM_EXIT_SHUTDOWN`: triple fault (Linux `reboot=t`) or shutdown.
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` of this type (1 shutdown, 2 reset, 3 crash).
    SystemEvent(u32),
    /// `KVM_EXIT_HLT` (only without an in-kernel irqchip).
    Halted,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError(InternalError),
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// Physical CPU.
        cpu: u32,
    },
    /// An exit the VMM does not handle.
    Unhandled(String),
    /// `KVM_RUN` itself failed.
    RunFailed(String),
}

/// A vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Create vCPU `id` (also its APIC id).
    pub fn new(vm: &Vm, id: u8) -> Result<Vcpu> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { id, fd })
    }

    /// The index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Set CPUID, MSRs, FPU and LAPIC LINTs; for the boot vCPU (`entry` given) also registers
    /// and segments. Other vCPUs wait for INIT/SIPI from the boot vCPU.
    pub fn configure(&self, vm: &Vm, nr_vcpus: u8, entry: Option<EntryPoint>) -> Result<()> {
        setup_cpuid(&self.fd, vm.supported_cpuid(), self.id, nr_vcpus)?;
        setup_msrs(&self.fd, self.id, vm.msr_list())?;
        setup_fpu(&self.fd, self.id)?;
        if vm.has_irqchip() {
            setup_lint(&self.fd, self.id)?;
        }
        if let Some(entry) = entry {
            setup_sregs(&self.fd, self.id, entry)?;
            setup_regs(&self.fd, self.id, entry)?;
        }
        Ok(())
    }

    /// Run until an exit ends the VM or `ctx.stop` is set.
    pub fn run(mut self, ctx: &VcpuContext) -> VcpuStop {
        loop {
            if ctx.stop.load(Ordering::Acquire) {
                return VcpuStop::Stopped;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        ctx.pio.read(u64::from(port), data);
                    }
                    VcpuExit::IoOut(port, data) => {
                        ctx.pio.write(u64::from(port), data);
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !ctx.mmio.read(addr, data) {
                            tracing::debug!(
                                "vCPU {}: MMIO read of {addr:#x} hits nothing",
                                self.id
                            );
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !ctx.mmio.write(addr, data) {
                            tracing::debug!(
                                "vCPU {}: MMIO write to {addr:#x} hits nothing",
                                self.id
                            );
                        }
                    }
                    VcpuExit::Hlt => return VcpuStop::Halted,
                    VcpuExit::Shutdown => return VcpuStop::Shutdown,
                    VcpuExit::SystemEvent(kind, _) => return VcpuStop::SystemEvent(kind),
                    VcpuExit::FailEntry(reason, cpu) => return VcpuStop::FailEntry { reason, cpu },
                    VcpuExit::InternalError => {
                        let e = self.internal_error(&ctx.mem);
                        if e.is_unemulated_int3() && self.deliver_breakpoint() {
                            continue;
                        }
                        return VcpuStop::InternalError(e);
                    }
                    VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                    other => return VcpuStop::Unhandled(format!("{other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VcpuStop::RunFailed(e.to_string()),
            }
        }
    }

    /// Completes an `int3` that KVM's instruction emulator could not run: RIP moves past the
    /// one-byte instruction and #BP (vector 3, a trap, no error code) is injected, which is
    /// what the CPU itself does. KVM only emulates guest ring-0 code on hosts without
    /// hardware virtualization (PVM); Linux executes `int3` at boot (the alternatives
    /// self-test, text patching), so without this no unmodified kernel gets past early boot
    /// there. Returns false when KVM refuses the registers or the event.
    fn deliver_breakpoint(&mut self) -> bool {
        let Ok(mut regs) = self.fd.get_regs() else {
            return false;
        };
        let Ok(mut events) = self.fd.get_vcpu_events() else {
            return false;
        };
        regs.rip = regs.rip.wrapping_add(1);
        events.exception.injected = 1;
        events.exception.nr = BREAKPOINT_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        tracing::debug!(
            "vCPU {}: int3 at {:#x} delivered as #BP",
            self.id,
            regs.rip - 1
        );
        self.fd.set_regs(&regs).is_ok() && self.fd.set_vcpu_events(&events).is_ok()
    }

    fn internal_error(&mut self, mem: &GuestMem) -> InternalError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; it is plain integers.
        let (suberror, ndata, raw) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let data: Vec<u64> = raw.iter().take(ndata.min(16) as usize).copied().collect();
        let mut insn = Vec::new();
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: for emulation failures KVM fills `emulation_failure` (same memory as
            // `internal`): flags, then up to 15 instruction bytes when flag bit 0 is set.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            if ndata >= 2 && ef.flags & 1 != 0 {
                // SAFETY: the union member with the instruction bytes, valid per the flag.
                let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
                insn = bytes.insn_bytes[..n].to_vec();
            }
        }
        let (rip, rip_phys) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                let mode = PagingMode::from_regs(sregs.cr0, sregs.cr4, sregs.efer);
                let linear = if mode == PagingMode::Level4 && sregs.cs.l == 1 {
                    regs.rip
                } else {
                    sregs.cs.base.wrapping_add(regs.rip)
                };
                (linear, translate(mem, mode, sregs.cr3, linear))
            }
            _ => (0, None),
        };
        if insn.is_empty() {
            if let Some(p) = rip_phys {
                let mut buf = [0u8; 15];
                for (i, b) in buf.iter_mut().enumerate() {
                    match mem.read_obj::<u8>(GuestAddress(p.wrapping_add(i as u64))) {
                        Ok(v) => *b = v,
                        Err(_) => break,
                    }
                    insn.push(*b);
                }
            }
        }
        InternalError {
            vcpu: self.id,
            suberror,
            data,
            rip,
            rip_phys,
            insn,
        }
    }
}

impl VcpuStop {
    /// Describe the stop for the VMM's exit message.
    pub fn describe(&self, vcpu: u8) -> String {
        match self {
            VcpuStop::Stopped => format!("vCPU {vcpu} stopped"),
            VcpuStop::Shutdown => format!("vCPU {vcpu}: guest shut down (triple fault or reboot)"),
            VcpuStop::SystemEvent(k) if *k == KVM_SYSTEM_EVENT_SHUTDOWN => {
                format!("vCPU {vcpu}: guest powered off")
            }
            VcpuStop::SystemEvent(k) if *k == KVM_SYSTEM_EVENT_RESET => {
                format!("vCPU {vcpu}: guest reset")
            }
            VcpuStop::SystemEvent(k) => format!("vCPU {vcpu}: system event {k}"),
            VcpuStop::Halted => format!("vCPU {vcpu}: guest halted"),
            VcpuStop::InternalError(e) => e.to_string(),
            VcpuStop::FailEntry { reason, cpu } => format!(
                "vCPU {vcpu}: KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host CPU {cpu})"
            ),
            VcpuStop::Unhandled(what) => format!("vCPU {vcpu}: unhandled exit {what}"),
            VcpuStop::RunFailed(e) => format!("vCPU {vcpu}: KVM_RUN failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_emulation_failure_on_int3_is_completed() {
        let e = |suberror, insn: &[u8]| InternalError {
            vcpu: 0,
            suberror,
            data: vec![],
            rip: 0xffff_ffff_81bf_b47c,
            rip_phys: Some(0x1bf_b47c),
            insn: insn.to_vec(),
        };
        assert!(e(1, &[0xcc, 0x90, 0x90]).is_unemulated_int3());
        // int n, lock cmpxchg16b, xrstor, popcnt: not completed, the VM stops and says why.
        for insn in [
            &[0xcd, 0x03][..],
            &[0xf0, 0x48, 0x0f, 0xc7, 0x0e],
            &[0x48, 0x0f, 0xae, 0x2f],
            &[0xf3, 0x48, 0x0f, 0xb8, 0xc7],
            &[],
        ] {
            assert!(!e(1, insn).is_unemulated_int3(), "{insn:02x?}");
        }
        // A 0xcc byte under another suberror is not an emulation failure.
        assert!(!e(3, &[0xcc]).is_unemulated_int3());
    }

    #[test]
    fn internal_error_message_names_suberror_and_bytes() {
        let e = InternalError {
            vcpu: 0,
            suberror: 1,
            data: vec![1, 3],
            rip: 0x1000,
            rip_phys: Some(0x1000),
            insn: vec![0xcc, 0x90],
        };
        let s = e.to_string();
        assert!(
            s.contains("KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure)"),
            "{s}"
        );
        assert!(s.contains("RIP 0x1000"));
        assert!(s.contains("instruction bytes: cc 90"));
        let e = InternalError {
            insn: vec![],
            rip_phys: None,
            ..e
        };
        assert!(e.to_string().contains("unavailable"));
    }
}
