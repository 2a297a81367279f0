//! A byte queue for data that a non-blocking writer could not take yet.

use std::io::{self, ErrorKind, Write};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Bytes waiting to be written, oldest first. Grows on demand; the connection bounds it through
/// the credit it advertises.
#[derive(Debug, Default)]
pub struct TxBuf {
    data: Vec<u8>,
    start: usize,
}

impl TxBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    /// Append the contents of a guest memory slice.
    pub fn push_volatile<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) {
        let old = self.data.len();
        self.data.resize(old + src.len(), 0);
        let copied = src.copy_to(&mut self.data[old..]);
        self.data.truncate(old + copied);
    }

    /// Write as much as `w` takes without blocking. Returns the number of bytes written;
    /// `WouldBlock` is not an error, other write errors are.
    pub fn flush_to<W: Write>(&mut self, mut w: W) -> io::Result<usize> {
        let mut written = 0;
        while !self.is_empty() {
            match w.write(&self.data[self.start..]) {
                Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.start += n;
                    written += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.is_empty() {
            self.data.clear();
            self.start = 0;
            // Do not keep a large allocation around for an idle connection.
            if self.data.capacity() > 64 * 1024 {
                self.data.shrink_to(64 * 1024);
            }
        } else if self.start > self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call and then blocks.
    struct Trickle {
        out: Vec<u8>,
        cap: usize,
        budget: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.cap).min(self.budget);
            self.out.extend_from_slice(&buf[..n]);
            self.budget -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn keeps_order_across_partial_writes() {
        let mut b = TxBuf::new();
        b.push(b"hello ");
        b.push(b"world");
        let mut w = Trickle {
            out: vec![],
            cap: 3,
            budget: 4,
        };
        assert_eq!(b.flush_to(&mut w).unwrap(), 4);
        assert_eq!(b.len(), 7);
        b.push(b"!");
        w.budget = 100;
        assert_eq!(b.flush_to(&mut w).unwrap(), 8);
        assert!(b.is_empty());
        assert_eq!(w.out, b"hello world!");
    }

    #[test]
    fn hard_errors_surface() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut b = TxBuf::new();
        b.push(b"x");
        assert_eq!(
            b.flush_to(Broken).unwrap_err().kind(),
            ErrorKind::BrokenPipe
        );
        assert_eq!(b.len(), 1);
        let mut empty = TxBuf::new();
        assert_eq!(empty.flush_to(Broken).unwrap(), 0);
    }
}
