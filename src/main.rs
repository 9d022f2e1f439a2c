use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = writ::cli::Cli::parse();
    // A worker that runs out of work tells the decision log's group commit that holding a
    // sync back for more records no longer costs nothing.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(writ::audit::worker_parked)
        .on_thread_unpark(writ::audit::worker_unparked)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: writ::cli::Cli) -> std::process::ExitCode {
    let json_logs = matches!(cli.command, writ::cli::Command::Serve { .. });
    init_tracing(json_logs);
    match writ::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The answer is printed; the status says it.
        Err(e) if e.is::<writ::cli::TokenInactive>() => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WRIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour for a person at a terminal; plain text for a file, a pipe or a collector.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        // Every line of a request carries the request span (request_id, the caller's
        // client_request_id when it sent one, method, route).
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.compact().init();
    }
}
