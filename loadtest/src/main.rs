//! `loadtest`: benchmarks against real PostgreSQL on this machine.
//!   compare: pgbench side by side: direct, stolon-proxy engines, HAProxy, PgBouncer
//!   sever:   time to close N sessions after a master change, and memory per idle session

mod compare;
mod pgbench;
mod procstat;
mod sever;
mod targets;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Benchmarks of stolon-proxy against real PostgreSQL"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// pgbench through each target in alternating rounds; ratios to direct in the same round
    Compare {
        /// Rounds (each runs every workload on every target, in a rotating order)
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per pgbench run
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// pgbench scale factor
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// stolon-proxy engines to run (comma list; `engine:threads` pins the thread count)
        #[arg(long, default_value = "tokio-tpc,tokio-mt", value_delimiter = ',')]
        engines: Vec<String>,
        /// Leave out HAProxy and PgBouncer
        #[arg(long)]
        no_peers: bool,
        /// Also run HAProxy pinned to these thread counts (comma list), as `haproxy:N`
        #[arg(long, value_delimiter = ',')]
        haproxy_threads: Vec<u32>,
        /// Only these workloads (names as printed, comma list)
        #[arg(long, value_delimiter = ',')]
        workloads: Option<Vec<String>>,
        /// Also write the table to this file
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Sever time with N open sessions, and proxy memory per idle session
    Sever {
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[arg(long, default_value_t = 20)]
        tries: usize,
        #[arg(long, default_value = "tokio-tpc")]
        engine: String,
        /// Where sessions end: fake (a minimal backend, no process teardown noise) or postgres
        #[arg(long, default_value = "fake", value_parser = ["fake", "postgres"])]
        backend: String,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Compare {
            rounds,
            seconds,
            scale,
            engines,
            no_peers,
            haproxy_threads,
            workloads,
            out,
        } => compare::run(&compare::Options {
            rounds,
            seconds,
            scale,
            engines,
            peers: !no_peers,
            haproxy_threads,
            workloads,
            out,
        }),
        Cmd::Sever {
            sessions,
            tries,
            engine,
            backend,
        } => sever::run(&sever::Options {
            sessions,
            tries,
            engine,
            fake_backend: backend == "fake",
        }),
    }
}
