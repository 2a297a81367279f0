//! `husk`: a runc-compatible OCI runtime whose containers each run in
//! their own lightweight VM, plus `check` (what this host can run).
//! Usable as podman's `--runtime`, conmon's runtime and containerd's runc
//! shim `BinaryName`.

mod check;
mod oci;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use oci::{exec, info, lifecycle, monitor, Global};

/// husk: containers in lightweight VMs, with runc's command line.
#[derive(Debug, Parser)]
#[command(name = "husk", version, about)]
struct Cli {
    /// Directory of container state.
    #[arg(long, global = true, default_value = "/run/husk-oci")]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility (cgroups live in the guest).
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (true, false or auto; also `spec
    /// --rootless`).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    /// Log level (error, warn, info, debug, trace) for messages on stderr.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a container (its VM boots; the process waits for start).
    Create(lifecycle::CreateArgs),
    /// Start a created container's process.
    Start {
        /// Container id.
        id: String,
    },
    /// Create and start a container; wait for it unless detached.
    Run(lifecycle::RunArgs),
    /// Print a container's state as JSON.
    State {
        /// Container id.
        id: String,
    },
    /// Send a signal to the container's process (or all with --all).
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        /// Container id.
        id: String,
        /// Signal name or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container (and its VM).
    Delete {
        /// Kill it first if it runs.
        #[arg(short, long)]
        force: bool,
        /// Container id.
        id: String,
    },
    /// Run a new process in a running container.
    Exec(exec::ExecArgs),
    /// List the container's processes (guest pids).
    Ps {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Container id.
        id: String,
        /// Accepted for runc compatibility (ps options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Ids only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Print container events (stats; OOM kills).
    Events {
        /// One stats event, then exit.
        #[arg(long)]
        stats: bool,
        /// Interval between stats events.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// Container id.
        id: String,
    },
    /// Change a container's resource limits.
    Update(info::UpdateArgs),
    /// Freeze a container's processes.
    Pause {
        /// Container id.
        id: String,
    },
    /// Thaw a paused container.
    Resume {
        /// Container id.
        id: String,
    },
    /// Print the OCI features document.
    Features,
    /// Write a default config.json.
    Spec {
        /// Bundle directory.
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Report what this host can run, ending with one verdict line.
    Check(check::CheckArgs),
    /// Print husk's version.
    Version,
    /// Internal: the monitor process of one container.
    #[command(name = "__monitor", hide = true)]
    Monitor(monitor::MonitorArgs),
    /// Internal: the relay of a detached exec.
    #[command(name = "__exec", hide = true)]
    ExecRelay(exec::ExecRelayArgs),
}

fn init_logging(cli: &Cli) {
    let level = if cli.debug {
        "debug"
    } else {
        cli.log_level.as_str()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let file = cli.log.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    // The monitor and exec relays hold the container's stdio: their
    // messages must never land in the container's stderr.
    let relay = matches!(cli.command, Cmd::Monitor(_) | Cmd::ExecRelay(_));
    match file {
        // The log file is in the caller's format; errors go there through
        // log_error, other messages only when --debug asks for them.
        Some(f) if cli.debug => b
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        Some(_) => b.with_writer(std::io::sink).init(),
        None if relay => b.with_writer(std::io::sink).init(),
        None => b.with_writer(std::io::stderr).init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli);
    let g = Global {
        root: cli.root.clone(),
        log: cli.log.clone(),
        log_json: cli.log_format == "json",
        debug: cli.debug,
    };
    let result = match cli.command {
        Cmd::Create(a) => lifecycle::create(&g, a),
        Cmd::Start { id } => lifecycle::start(&g, &id),
        Cmd::Run(a) => lifecycle::run(&g, a),
        Cmd::State { id } => lifecycle::state(&g, &id),
        Cmd::Kill { all, id, signal } => lifecycle::kill(&g, &id, &signal, all),
        Cmd::Delete { force, id } => lifecycle::delete(&g, &id, force),
        Cmd::Exec(a) => exec::exec(&g, a),
        Cmd::Ps { format, id, .. } => info::ps(&g, &id, &format),
        Cmd::List { format, quiet } => lifecycle::list(&g, &format, quiet),
        Cmd::Events {
            stats,
            interval,
            id,
        } => info::events(&g, &id, stats, &interval),
        Cmd::Update(a) => info::update(&g, a),
        Cmd::Pause { id } => info::set_paused(&g, &id, true),
        Cmd::Resume { id } => info::set_paused(&g, &id, false),
        Cmd::Features => info::features(),
        Cmd::Spec { bundle, .. } => info::spec(&bundle),
        Cmd::Check(args) => check::run(args),
        Cmd::Version => {
            println!("husk version {}", env!("CARGO_PKG_VERSION"));
            println!("spec: {}", oci::state::OCI_VERSION);
            println!("agent API {}", husk_protocols::API_VERSION);
            Ok(0)
        }
        Cmd::Monitor(a) => Ok(monitor::run(&g, a)),
        Cmd::ExecRelay(a) => Ok(exec::relay(&g, a)),
    };
    match result {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            oci::log_error(&g, &format!("{e:#}"));
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn runc_style_invocations_parse() {
        for argv in [
            &[
                "husk",
                "--root",
                "/r",
                "--log",
                "/l",
                "--log-format",
                "json",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "--console-socket",
                "/s",
                "id",
            ][..],
            &[
                "husk",
                "--root",
                "/r",
                "--systemd-cgroup",
                "exec",
                "--process",
                "/p",
                "--detach",
                "--pid-file",
                "/f",
                "id",
            ],
            &[
                "husk",
                "exec",
                "-t",
                "--env",
                "A=1",
                "--cwd",
                "/",
                "--user",
                "0:0",
                "id",
                "sh",
                "-c",
                "echo -n hi",
            ],
            &["husk", "kill", "--all", "id", "9"],
            &["husk", "delete", "--force", "id"],
            &["husk", "ps", "--format", "json", "id"],
            &["husk", "events", "--stats", "id"],
            &["husk", "spec", "--rootless", "-b", "/b"],
            &["husk", "--rootless", "true", "list", "-q"],
        ] {
            assert!(Cli::try_parse_from(argv).is_ok(), "{argv:?}");
        }
    }
}
