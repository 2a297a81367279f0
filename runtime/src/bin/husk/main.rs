//! `husk`: the husk command line. Today: `check` (what this host can run,
//! optionally booting a sandbox) and `version`; the runc-compatible OCI
//! commands come with the OCI CLI work.

mod check;

use clap::{Parser, Subcommand};

/// husk: containers in lightweight VMs.
#[derive(Debug, Parser)]
#[command(name = "husk", version, about)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) for messages on stderr.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Report what this host can run, ending with one verdict line.
    Check(check::CheckArgs),
    /// Print husk's version.
    Version,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match cli.command {
        Cmd::Check(args) => check::run(args),
        Cmd::Version => {
            println!("husk version {}", env!("CARGO_PKG_VERSION"));
            println!("agent API {}", husk_protocols::API_VERSION);
            Ok(0)
        }
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("husk: {e:#}");
            std::process::exit(1);
        }
    }
}
