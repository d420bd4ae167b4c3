//! The `wshost` binary: parses the command line, installs logging, binds, and runs the library.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use wshost::cli::{CheckArgs, Cli, Command, ServeArgs};
use wshost::{Registry, Server};

fn main() -> ExitCode {
    let version: &'static str = Box::leak(wshost::cli::version().into_boxed_str());
    let matches = Cli::command().version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Check(args) => check(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wshost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::new(args.config()).context("starting wshost")?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        tracing::info!(%addr, "listening");
        // Tests and scripts read this line to learn the real address.
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on ws://{addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        server.serve(listener, shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received; shutting down (send it again to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let registry = Registry::new(Default::default()).context("creating a private directory")?;
    let mut refused = 0;
    for file in &args.files {
        match registry.check_file(file) {
            Ok(p) => {
                println!(
                    "ok {}: plugin `{}` {} routes {} plugin-api {}",
                    file.display(),
                    p.name,
                    p.version,
                    p.routes.join(","),
                    p.api_version
                );
            }
            Err(e) => {
                refused += 1;
                println!("refused {e}");
            }
        }
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
