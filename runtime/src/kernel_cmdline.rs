//! The guest kernel command line, built from typed parts and checked before
//! it reaches a VMM.

use std::fmt;

use crate::error::{Error, Result};

/// Longest command line an x86 Linux kernel accepts (COMMAND_LINE_SIZE).
pub const MAX_LEN: usize = 2048;

/// An ordered list of `key` or `key=value` words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    words: Vec<String>,
}

impl KernelCmdline {
    /// An empty command line.
    pub fn new() -> Self {
        Self::default()
    }

    /// The command line every husk guest boots with: console on the first
    /// serial port, reboot (our power-off) by triple fault, reboot at once
    /// on panic so the VMM exits, quiet boot.
    pub fn husk_default() -> Self {
        let mut c = Self::new();
        for w in [
            "console=ttyS0",
            "reboot=t",
            "panic=-1",
            "quiet",
            "8250.nr_uarts=1",
        ] {
            c.words.push(w.to_string());
        }
        c
    }

    /// Appends `key` alone. Fails on an empty key or one with whitespace,
    /// quotes or `=`.
    pub fn flag(&mut self, key: &str) -> Result<&mut Self> {
        check_word(key, "key")?;
        if key.contains('=') {
            return Err(Error::Config(format!(
                "kernel command line key {key:?} must not contain '='"
            )));
        }
        self.words.push(key.to_string());
        Ok(self)
    }

    /// Appends `key=value`, replacing an earlier value of the same key.
    pub fn set(&mut self, key: &str, value: impl fmt::Display) -> Result<&mut Self> {
        let value = value.to_string();
        check_word(key, "key")?;
        check_word(&value, "value")?;
        if key.contains('=') {
            return Err(Error::Config(format!(
                "kernel command line key {key:?} must not contain '='"
            )));
        }
        let prefix = format!("{key}=");
        self.words.retain(|w| !w.starts_with(&prefix));
        self.words.push(format!("{key}={value}"));
        Ok(self)
    }

    /// Appends words given by the user as one string (e.g. from config).
    pub fn extend_raw(&mut self, extra: &str) -> Result<&mut Self> {
        for w in extra.split_ascii_whitespace() {
            check_word(w, "word")?;
            self.words.push(w.to_string());
        }
        Ok(self)
    }

    /// Whether a word with this key is present.
    pub fn has(&self, key: &str) -> bool {
        self.words
            .iter()
            .any(|w| w == key || w.strip_prefix(key).is_some_and(|r| r.starts_with('=')))
    }

    /// The final string, checked against the kernel's length limit.
    pub fn render(&self) -> Result<String> {
        let s = self.words.join(" ");
        if s.len() >= MAX_LEN {
            return Err(Error::Config(format!(
                "kernel command line is {} bytes, the kernel takes at most {}",
                s.len(),
                MAX_LEN - 1
            )));
        }
        Ok(s)
    }
}

fn check_word(w: &str, what: &str) -> Result<()> {
    if w.is_empty()
        || w.chars()
            .any(|c| c.is_whitespace() || c == '"' || c.is_control())
    {
        return Err(Error::Config(format!(
            "kernel command line {what} {w:?} is empty or has whitespace, quotes or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_line_powers_off_through_reboot_and_panics_out() {
        let c = KernelCmdline::husk_default();
        let s = c.render().unwrap();
        assert!(s.starts_with("console=ttyS0 "));
        assert!(c.has("reboot") && c.has("panic") && c.has("quiet"));
        assert!(!c.has("pani"));
    }

    #[test]
    fn set_replaces_and_validates() {
        let mut c = KernelCmdline::new();
        c.set("tsc_early_khz", 2_600_000).unwrap();
        c.set("tsc_early_khz", 1000).unwrap();
        c.flag("noapictimer").unwrap();
        assert_eq!(c.render().unwrap(), "tsc_early_khz=1000 noapictimer");
        assert!(c.set("a b", 1).is_err());
        assert!(c.set("k", "x y").is_err());
        assert!(c.set("k", "").is_err());
        assert!(c.set("k=v", 1).is_err());
        assert!(c.flag("q\"").is_err());
        assert!(c.flag("x=1").is_err());
    }

    #[test]
    fn raw_words_and_length_limit() {
        let mut c = KernelCmdline::new();
        c.extend_raw("  husk.log=debug   loglevel=7 ").unwrap();
        assert_eq!(c.render().unwrap(), "husk.log=debug loglevel=7");
        c.set("big", "x".repeat(MAX_LEN)).unwrap();
        assert!(matches!(c.render(), Err(Error::Config(_))));
    }
}
