//! The `stratus` command: `run`, `check` and `demo`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stratus_node::config::{Config, ConfigError};
use stratus_node::server::{self, RunOptions};

/// Exit status for a bad config (sysexits EX_USAGE, as linkerd2-proxy does).
const EXIT_CONFIG: u8 = 64;
/// Exit status for a runtime failure such as a taken port.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "stratus",
    version,
    about = "A tiered-cache CDN node on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node in the foreground.
    Run {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Take the listening sockets over from a running old process.
        #[arg(long)]
        upgrade: bool,
        /// Socket for the hand-over (default /tmp/stratus-NAME-upgrade.sock).
        #[arg(long)]
        upgrade_sock: Option<String>,
        /// Exit at once when the process that started this one dies (test harnesses: no
        /// node outlives its test run, even when the runner is killed).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
        /// Log lines (access log included) as plain text or one JSON object per line.
        #[arg(long, value_enum, env = "STRATUS_LOG_FORMAT", default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config: exit 0, or 64 listing every problem.
    Check {
        /// The TOML config to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// The whole system on this machine: a demo origin and a fleet of nodes.
    Demo {
        /// The demo uses ports N to N+19.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Send spans to this OTLP/HTTP collector instead of the bundled Jaeger.
        #[arg(long)]
        otlp: Option<String>,
        /// Exit at once when the process that started this one dies (tests).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
    /// Only the demo origin (host demo.test), for load benchmarks.
    #[command(hide = true)]
    DemoOrigin {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// An OTLP/HTTP receiver that discards spans, for load benchmarks of the export path.
    #[command(hide = true)]
    OtlpSink {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// `TIME LEVEL target: message key=value …`
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`.
    Json,
}

/// What is logged unless `RUST_LOG` says otherwise: stratus's own lines (startup, reloads,
/// the access log on target `stratus::access`) from info, everything else from warn.
const DEFAULT_LOG_FILTER: &str = "warn,stratus=info,stratus_node=info,pingora_cache::meta=error";

/// Logs go through `tracing` (Pingora's `log` records too, via tracing-subscriber's log bridge)
/// to stderr, filtered by `RUST_LOG` (default [`DEFAULT_LOG_FILTER`]). Request log lines carry
/// `trace_id`. With `telemetry`, spans of background work are exported too (target
/// `stratus::background`, whatever `RUST_LOG` says).
fn init_logging(format: LogFormat, telemetry: Option<&stratus_tracing::Telemetry>) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let background = telemetry.and_then(|t| t.background_layer());
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(background);
    // Text fields as `name=value`, without the default formatter's per-field styling: the
    // access line's 13 fields were 14% of a hot hit's instructions (benches/results/README.md).
    let plain_fields = PlainFields;
    let _ = match format {
        LogFormat::Text if std::io::stderr().is_terminal() => registry
            .with(lines.with_ansi(true).with_filter(filter))
            .try_init(),
        LogFormat::Text => registry
            .with(
                lines
                    .with_ansi(false)
                    .fmt_fields(plain_fields)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(lines.json().with_ansi(false).with_filter(filter))
            .try_init(),
    };
}

/// Text log fields as `name=value` separated by spaces, the message bare first, the `log`
/// bridge's `log.*` metadata left out: what tracing-subscriber's default formatter writes
/// without colour, without its per-field styling calls.
struct PlainFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for PlainFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let pad = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        self.result = match name {
            // A message may quote what a peer sent (pingora's errors do): control characters
            // are escaped, as the default formatter does, so no one can write to a terminal.
            "message" => write!(NoControl(&mut self.writer), "{pad}{value:?}"),
            name => write!(self.writer, "{pad}{name}={value:?}"),
        };
    }
}

/// Writes through to `W`, with control characters written as `\u{..}` escapes.
struct NoControl<'a, W>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for NoControl<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if !s.chars().any(char::is_control) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            if c.is_control() {
                write!(self.0, "{}", c.escape_unicode())?;
            } else {
                self.0.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// The helper servers behind hidden commands, for benchmarks.
enum Helper {
    DemoOrigin,
    OtlpSink,
}

fn serve_helper(listen: std::net::SocketAddr, helper: Helper) -> ExitCode {
    let served = runtime().map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind(listen).await?;
            match helper {
                Helper::DemoOrigin => stratus_node::demo::serve_origin(l).await,
                Helper::OtlpSink => stratus_node::demo::serve_otlp_sink(l).await,
            }
            Ok(())
        })
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stratus: {listen}: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        for line in e.lines() {
            eprintln!("{line}");
        }
        match e {
            ConfigError::Read { .. } => ExitCode::from(EXIT_RUNTIME),
            ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
        }
    })
}

/// Exits the process as soon as its parent is gone (it is then re-parented, so the parent
/// id changes). A thread that polls is the only way without `unsafe` (`prctl` would need a
/// `pre_exec` hook in the parent, and fires when the spawning *thread* ends).
fn watch_parent() {
    let parent = std::os::unix::process::parent_id();
    let _ = std::thread::Builder::new()
        .name("exit-with-parent".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(EXIT_RUNTIME.into());
            }
        });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        init_logging(LogFormat::Text, None);
    }
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(cfg) => {
                for note in cfg.notes() {
                    println!("{}: {note}", config.display());
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Demo {
            base_port,
            otlp,
            exit_with_parent,
        } => {
            if exit_with_parent {
                watch_parent();
            }
            let opts = stratus_node::demo::DemoOptions { base_port, otlp };
            match runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(stratus_node::demo::run(opts)))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("stratus demo: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::DemoOrigin { listen } => serve_helper(listen, Helper::DemoOrigin),
        Command::OtlpSink { listen } => serve_helper(listen, Helper::OtlpSink),
        Command::Run {
            config,
            upgrade,
            upgrade_sock,
            exit_with_parent,
            log_format,
        } => {
            if exit_with_parent {
                watch_parent();
            }
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if !upgrade {
                if let Err(why) = cfg.check_ports() {
                    eprintln!("{}: {why}", config.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
            let opts = RunOptions {
                upgrade,
                upgrade_sock,
                config_path: Some(config.clone()),
            };
            // Logging starts with the telemetry, so background spans reach Jaeger too.
            let telemetry = match server::telemetry(&cfg) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{}: tracing: {e:#}", config.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            init_logging(log_format, Some(&telemetry));
            match server::build(cfg, telemetry, &opts) {
                Ok(node) => {
                    node.run();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e:#}", config.display());
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}
