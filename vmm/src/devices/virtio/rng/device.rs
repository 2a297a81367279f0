//! The entropy device.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::defs::{MAX_BYTES_PER_CHAIN, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::devices::virtio::device::ActivateError;
use crate::devices::virtio::{GuestMem, VirtioDevice, VirtioInterrupt};

struct Active {
    mem: Arc<GuestMem>,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-rng device.
#[derive(Default)]
pub struct Rng {
    active: Option<Active>,
    acked: u64,
    bytes_served: u64,
}

impl Rng {
    /// A device that is not yet activated.
    pub fn new() -> Rng {
        Rng::default()
    }

    /// Random bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    fn process_queue(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mem = &*a.mem;
        let mut used_any = false;
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = a.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain.writable() {
                let mut left = (desc.len() as usize).min(MAX_BYTES_PER_CHAIN - written);
                let mut addr = desc.addr();
                while left > 0 {
                    let n = left.min(buf.len());
                    if fill_random(&mut buf[..n]).is_err() {
                        break;
                    }
                    if mem.write_slice(&buf[..n], addr).is_err() {
                        tracing::debug!(
                            "virtio-rng: buffer at {:#x} is outside guest memory",
                            addr.0
                        );
                        break;
                    }
                    written += n;
                    left -= n;
                    addr = GuestAddress(addr.0.wrapping_add(n as u64));
                }
                if written >= MAX_BYTES_PER_CHAIN {
                    break;
                }
            }
            if let Err(e) = a.queue.add_used(mem, head, written as u32) {
                tracing::debug!("virtio-rng: cannot return a buffer: {e}");
                break;
            }
            self.bytes_served += written as u64;
            used_any = true;
        }
        used_any && a.queue.needs_notification(mem).unwrap_or(true)
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which we own mutably.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Arc<GuestMem>,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        if index == 0 && self.process_queue() {
            if let Some(a) = &self.active {
                a.interrupt.signal_used_queue();
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}
