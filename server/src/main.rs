//! The `mantissa` binary: parses the command line, sets up logging and signals, and hands
//! over to the library.

use anyhow::Context;
use clap::Parser;
use mantissa::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("invalid log filter '{filter}'"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => tracing::info!("received SIGINT"),
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let grpc = tokio::net::TcpListener::bind(args.grpc_addr)
                    .await
                    .with_context(|| format!("cannot bind gRPC address {}", args.grpc_addr))?;
                let metrics = tokio::net::TcpListener::bind(args.metrics_addr)
                    .await
                    .with_context(|| format!("cannot bind metrics address {}", args.metrics_addr))?;
                tracing::info!(grpc_addr = %grpc.local_addr()?, metrics_addr = %metrics.local_addr()?, "listening");
                mantissa::lifecycle::startup::run(args.server_config(), grpc, Some(metrics), shutdown_signal()).await?;
                Ok(())
            }
            Command::Bench(args) => Ok(mantissa::commands::bench::run(args).await?),
            Command::Quantize(args) => Ok(mantissa::commands::quantize::run(&args)?),
            Command::Analyze(args) => Ok(mantissa::commands::analyze::run(&args)?),
        }
    })
}
