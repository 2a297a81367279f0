//! husk-agent: PID 1 of a husk sandbox VM.
//!
//! As PID 1 it mounts the pseudo filesystems, reaps orphans, logs to the
//! console and serves the agent API (`husk-protocols`) over vsock port 1024.
//! Any fatal error takes the VM down, so the host sees the VMM exit instead
//! of a guest that never answers. Run outside a VM (not PID 1) it only
//! serves, on the address given with `--listen`, which is how its API is
//! tested on the host.

mod boot;
mod container;
mod init;
mod io_listener;
mod network;
mod oom;
mod reaper;
mod sandbox;
mod service;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use boot::BootStages;
use service::{AgentService, Control};

/// Where the agent listens by default (inside the VM).
fn default_listen() -> String {
    format!("vsock://-1:{}", husk_protocols::AGENT_VSOCK_PORT)
}

/// Options read from argv (outside a VM) or the kernel command line
/// (`husk.log=<level>`) as PID 1.
struct Options {
    listen: String,
    log: String,
}

fn parse_options(args: &[String], cmdline: &str) -> anyhow::Result<Options> {
    let mut o = Options {
        listen: default_listen(),
        log: "info,ttrpc=warn".into(),
    };
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("husk.log=") {
            o.log = v.to_string();
        }
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => o.listen = it.next().context("--listen needs an address")?.clone(),
            "--log" => o.log = it.next().context("--log needs a level")?.clone(),
            "--version" => {
                println!("husk-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: husk-agent [--listen ADDR] [--log LEVEL]"
            ),
        }
    }
    Ok(o)
}

fn main() {
    let is_init = std::process::id() == 1;
    let stages = Arc::new(BootStages::default());
    stages.mark("agent-start");
    if let Err(e) = run(is_init, stages) {
        eprintln!("husk-agent: fatal: {e:#}");
        if is_init {
            init::halt_vm();
        }
        std::process::exit(1);
    }
}

fn run(is_init: bool, stages: Arc<BootStages>) -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline = if is_init {
        // /proc is not mounted yet: mount first, then read options.
        init::mount_pseudo_filesystems().context("guest init")?;
        stages.mark("mounts-done");
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        String::new()
    };
    let opts = parse_options(&args, &cmdline)?;
    let filter = tracing_subscriber::EnvFilter::try_new(&opts.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ttrpc=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    // As PID 1, log to the console through our own close-on-exec fd, not
    // fd 2: libcontainer's child processes keep our logger, and their fd 2
    // becomes the container's stderr.
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(console) if is_init => logs.with_writer(std::sync::Mutex::new(console)).init(),
        _ => logs.with_writer(std::io::stderr).init(),
    }

    let wake = reaper::install().context("installing the SIGCHLD handler")?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || reaper::reap_forever(wake))
        .context("starting the reaper thread")?;

    let containers = Arc::new(container::Manager::default());
    let oom_events = Arc::new(oom::OomEvents::default());
    oom::spawn_watcher(containers.clone(), oom_events.clone())
        .context("starting the OOM watcher")?;
    let io_addr = match opts.listen.strip_prefix("unix://") {
        Some(path) => io_listener::IoAddr::Unix(format!("{path}.io").into()),
        None => io_listener::IoAddr::Vsock(husk_protocols::IO_VSOCK_PORT),
    };
    io_listener::spawn(io_addr, containers.clone()).context("starting the stdio listener")?;

    let (control_tx, control_rx) = mpsc::channel();
    let svc = Arc::new(AgentService::new(
        stages.clone(),
        control_tx,
        containers,
        oom_events,
    ));
    let health = husk_protocols::health_ttrpc::create_health(svc.clone());
    let agent = husk_protocols::agent_ttrpc::create_agent(svc);
    if let Some(path) = opts.listen.strip_prefix("unix://") {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let mut server = ttrpc::Server::new()
        .bind(&opts.listen)
        .with_context(|| format!("listening on {}", opts.listen))?
        .register_service(health)
        .register_service(agent);
    server
        .start()
        .with_context(|| format!("serving on {}", opts.listen))?;
    stages.mark("agent-listening");
    tracing::info!(listen = %opts.listen, "husk-agent {} ready", env!("CARGO_PKG_VERSION"));

    match control_rx.recv() {
        Ok(Control::Shutdown) | Err(_) => {
            // Give the Shutdown answer a moment to leave before the VM goes.
            std::thread::sleep(Duration::from_millis(20));
            tracing::info!("shutting down");
            if is_init {
                init::halt_vm();
            }
            server.shutdown();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_args_and_cmdline() {
        let o = parse_options(&[], "console=ttyS0 husk.log=debug quiet").unwrap();
        assert_eq!(o.log, "debug");
        assert_eq!(o.listen, "vsock://-1:1024");
        let args: Vec<String> = ["--listen", "unix:///tmp/a.sock"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse_options(&args, "").unwrap();
        assert_eq!(o.listen, "unix:///tmp/a.sock");
        assert!(parse_options(&["--bogus".to_string()], "").is_err());
        assert!(parse_options(&["--listen".to_string()], "").is_err());
    }
}
