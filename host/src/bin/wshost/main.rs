//! The `wshost` binary: parses the command line and the config file, installs logging, binds,
//! and runs the library; also the admin client, the plugin checker and the scaffold.

mod cli;
mod config_file;
mod scaffold;
mod values;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};
use cli::{AdminArgs, CheckArgs, Cli, Command, LogFormat, NewArgs, ServeArgs};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use wshost::admin::Status;
use wshost::plugin::registry::ReloadReport;
use wshost::{Registry, Server};

/// jemalloc, with its background thread: memory that connections free when they park (their
/// stream's buffers) goes back to the system within seconds, so a burst of connections does not
/// hold its peak's memory for the life of the process as glibc's malloc does (docs/bench/
/// idle-memory.md). Plugins allocate with their own allocator; what crosses the ABI is freed
/// by the side that allocated it.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let version: &'static str = Box::leak(cli::version().into_boxed_str());
    let command = Cli::command()
        .version(version)
        .mut_subcommand("serve", cli::with_default_help);
    let matches = command.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Config(_) => {
            let serve_cmd = Cli::command();
            let serve_cmd = serve_cmd
                .find_subcommand("serve")
                .expect("serve is a subcommand");
            print!("{}", config_file::print_defaults(serve_cmd));
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => check(&args),
        Command::Status(args) => status(&args),
        Command::Reload(args) => reload(&args),
        Command::New(args) => new_plugin(&args),
        Command::Probe(args) => {
            return wshost::plugin::probe::probe_main(&args.display_name, &args.file)
        }
        Command::Worker(args) => {
            return wshost::plugin::isolate::worker::worker_main(
                &wshost::plugin::isolate::worker::WorkerArgs {
                    socket: args.socket,
                    display_name: args.display_name,
                    file: args.file,
                    threads: args.threads,
                    callback_timeout_ms: args.callback_timeout_ms,
                },
            )
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wshost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // The command line and the environment over the config file over the defaults.
    let (file_settings, plugins) = match &args.config {
        Some(file) => {
            let loaded = config_file::load(file).context("config file")?;
            (loaded.settings, loaded.plugins)
        }
        None => Default::default(),
    };
    let settings = args.settings.overlay(file_settings).resolved();
    let s = settings.get();
    if s.tls_cert.is_some() != s.tls_key.is_some() {
        anyhow::bail!("--tls-cert and --tls-key (or tls_cert and tls_key) go together");
    }
    let listen = settings.listen();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let served = runtime.block_on(async {
        let exe = std::env::current_exe().context("finding the wshost binary for the probe")?;
        let mut config = settings.config(Some(exe), args.config.clone());
        config.plugins = plugins;
        let mut server = Server::new(config).context("starting wshost")?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let mut out = std::io::stdout().lock();
        let mut runtime_addr = None;
        if let Some((listener, addr)) = bind_admin(settings.admin_listen()).await? {
            let token = token(s.admin_token_file.as_deref(), "--admin-token-file")?;
            let guard = wshost::admin::AdminGuard {
                token,
                header_read_timeout: s.header_read_timeout.unwrap_or_default(),
            };
            writeln!(out, "admin on {addr}").context("writing to stdout")?;
            match wshost::admin::write_runtime_file(&addr) {
                Ok(_) => runtime_addr = Some(addr),
                Err(e) => {
                    tracing::warn!(error = %e, file = %wshost::admin::runtime_file().display(),
                    "cannot write the admin address where `wshost status` looks for it")
                }
            }
            server = server.with_admin(listener, guard);
        }
        tracing::info!(%addr, "listening");
        // Tests and scripts read this line to learn the real address.
        let scheme = if s.tls_cert.is_some() { "wss" } else { "ws" };
        writeln!(out, "listening on {scheme}://{addr}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        reload_on_sighup(server.reloader());
        server.serve(listener, shutdown_signal()).await;
        if let Some(addr) = runtime_addr {
            wshost::admin::remove_runtime_file(&addr);
        }
        if let cli::AdminListen::Unix(path) = settings.admin_listen() {
            let _ = std::fs::remove_file(path);
        }
        Ok(ExitCode::SUCCESS)
    });
    // Do not wait for blocking work still running (a plugin's constructor that hangs in a
    // reload): the shutdown deadline has passed.
    runtime.shutdown_background();
    served
}

/// Binds the admin endpoint as `--admin-listen` says: a TCP address, or a Unix socket that
/// only this user may open.
async fn bind_admin(
    listen: &cli::AdminListen,
) -> anyhow::Result<Option<(wshost::admin::AdminListener, wshost::admin::AdminAddr)>> {
    use cli::AdminListen;
    use std::os::unix::fs::PermissionsExt as _;
    use wshost::admin::{AdminAddr, AdminListener};
    Ok(match listen {
        AdminListen::Off => None,
        AdminListen::Tcp(at) => {
            let admin = TcpListener::bind(at).await.with_context(|| {
                format!("cannot listen on {at} for the admin endpoint (--admin-listen)")
            })?;
            let addr = admin.local_addr().context("reading the admin address")?;
            if !addr.ip().is_loopback() {
                tracing::warn!(admin_addr = %addr, "the admin endpoint is reachable from other hosts");
            }
            Some((AdminListener::Tcp(admin), AdminAddr::Tcp(addr.to_string())))
        }
        AdminListen::Unix(path) => {
            // A socket left by a host that did not exit cleanly: nobody answers on it.
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let admin = tokio::net::UnixListener::bind(path).with_context(|| {
                format!(
                    "cannot listen on {} for the admin endpoint (--admin-listen)",
                    path.display()
                )
            })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", path.display()))?;
            Some((AdminListener::Unix(admin), AdminAddr::Unix(path.clone())))
        }
    })
}

/// The admin client's address and token.
fn admin_target(args: &AdminArgs) -> anyhow::Result<(wshost::admin::AdminAddr, Option<String>)> {
    let addr = args
        .admin
        .clone()
        .unwrap_or_else(wshost::admin::default_client_addr);
    Ok((addr, token(args.token_file.as_deref(), "--token-file")?))
}

/// The token in the file `flag` named, if it named one.
fn token(file: Option<&std::path::Path>, flag: &str) -> anyhow::Result<Option<String>> {
    file.map(cli::read_token_file)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
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

/// Rescans the plugins directory on every SIGHUP.
fn reload_on_sighup(reloader: wshost::Reloader) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: rescanning the plugins directory");
                    reloader.request();
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGHUP; reload with `wshost reload`"),
    }
}

fn admin_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn status(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let (addr, token) = admin_target(args)?;
    let status: Status = admin_runtime()?.block_on(wshost::admin::request(
        &addr,
        hyper::Method::GET,
        "/status",
        token.as_deref(),
        args.timeout,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "wshost {} (plugin-api {}): {} plugin(s), {} libraries mapped, {} old generation(s) serving",
        status.host_version,
        status.plugin_api,
        status.plugins.len(),
        status.mapped_libraries,
        status.old_generations_serving
    );
    for p in &status.plugins {
        println!(
            "{} {} routes {} plugin-api {} file {}",
            p.name,
            p.version,
            p.routes.join(","),
            p.plugin_api,
            p.file
        );
        for g in &p.generations {
            println!(
                "  generation {}{} version {}: {} open connection(s)",
                g.generation,
                if g.current { " (current)" } else { "" },
                g.version,
                g.open_connections
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn reload(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let (addr, token) = admin_target(args)?;
    let report: ReloadReport = admin_runtime()?.block_on(wshost::admin::request(
        &addr,
        hyper::Method::POST,
        "/reload",
        token.as_deref(),
        args.timeout,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for l in &report.loaded {
            println!("loaded {l}");
        }
        for u in &report.unloaded {
            println!("unloaded {u}");
        }
        for r in &report.refused {
            println!("refused {r}");
        }
        if let Some(e) = &report.config_error {
            println!("config file not re-read (the running plugin sections stay): {e}");
        }
        if report.loaded.is_empty() && report.unloaded.is_empty() && report.refused.is_empty() {
            println!("no changes");
        }
    }
    Ok(
        if report.refused.is_empty() && report.config_error.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn new_plugin(args: &NewArgs) -> anyhow::Result<ExitCode> {
    let api = args
        .api_path
        .clone()
        .unwrap_or_else(scaffold::default_api_path);
    let dir = scaffold::new_plugin(&args.name, args.template, &args.path, &api)
        .with_context(|| format!("creating plugin `{}`", args.name))?;
    println!("created {}", dir.display());
    println!(
        "build it: (cd {} && cargo build --release), then copy target/release/lib{}.so into \
         the plugins directory",
        dir.display(),
        args.name.replace('-', "_")
    );
    Ok(ExitCode::SUCCESS)
}

fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the wshost binary for the probe")?;
    let probe = wshost::plugin::probe::Probe {
        exe,
        timeout: std::time::Duration::from_secs(10),
    };
    let sections = match &args.config {
        Some(file) => config_file::load(file).context("config file")?.plugins,
        None => Default::default(),
    };
    let registry = Registry::new(Default::default(), Some(probe))
        .context("creating a private directory")?
        .with_plugin_sections(sections);
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
