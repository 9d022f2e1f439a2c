//! The `writ` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::app::{Application, shutdown_signal};
use crate::audit::checkpoint::CheckpointKeys;
use crate::audit::{Verification, VerifyOptions};
use crate::config::Config;
use crate::dev::{self, DevFiles};
use crate::store::{AuditHead, BlockKind};
use crate::token::keys::{self, KeyAlg};

mod output;
pub use output::Output;

/// `writ token introspect` found the token inactive: the process exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("the token is not active")]
pub struct TokenInactive;

#[derive(Debug, Parser)]
#[command(
    name = "writ",
    version,
    about = "Short-lived, task-scoped credential broker"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// A self-contained broker for trying Writ (memory store, generated keys, dev trust domain).
    Dev(DevArgs),
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Policy commands.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Signing key commands.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Client side of the token exchange.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Task commands.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Emergency revocation (security teams).
    Revoke(RevokeArgs),
    /// Operations on the shared store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// List or lift standing revocations.
    Revocations {
        #[command(subcommand)]
        command: BlocksCommand,
    },
    /// List or lift quarantines (subjects a trip refused for a while).
    Quarantines {
        #[command(subcommand)]
        command: BlocksCommand,
    },
    /// The approver's side of approval gates: list, approve or deny held requests.
    Approvals {
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// Decision log commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard
    /// output, e.g. `writ completions bash > /etc/bash_completion.d/writ`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Mint a JWT-SVID from the dev trust domain key (dev only).
    Svid {
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        #[arg(long, value_name = "A", default_value = dev::DEV_AUDIENCE)]
        audience: String,
        #[arg(long, value_name = "D", default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate a config and read its key, bundle and policy files. Read-only and
    /// offline: it writes nothing, opens no decision log and connects to nothing (a wrong
    /// store URL or an unreachable OIDC issuer is not found here).
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Check keys and values only: read no key, bundle or policy file (for configs
        /// rendered away from their files, e.g. by the Helm chart).
        #[arg(long)]
        syntax_only: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate Cedar policies against the Writ schema.
    Check { dir: PathBuf },
    /// Run policy test cases (request -> expected decision).
    Test { dir: PathBuf, cases: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new PKCS#8 PEM signing key.
    Generate {
        #[arg(long, value_enum)]
        alg: KeyAlg,
        /// Where to write it (its folder is created); an existing file is kept unless
        /// `--force` is given.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Exchange a workload identity token for a task token; prints the token response JSON.
    Exchange(ExchangeArgs),
    /// As a sub-agent, exchange a delegation grant (a task token whose audience is this
    /// sub-agent's subject) with the sub-agent's own identity token; prints the token
    /// response JSON.
    Delegate(DelegateArgs),
    /// Ask the broker whether a token is active (RFC 7662, with the admin token): exits 0
    /// when it is active, 2 when it is not, 1 on an error.
    Introspect {
        /// File holding the token to look at, or `-` for standard input.
        #[arg(value_name = "TOKEN_FILE|-")]
        token: String,
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Where the broker is and how to be its admin.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
    #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
    broker: String,
    /// File holding the admin token, or `-` for standard input (default: the token
    /// itself from $WRIT_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE|-")]
    admin_token: Option<String>,
}

impl AdminArgs {
    fn client(&self) -> anyhow::Result<(crate::client::Client, String)> {
        let admin = admin_secret(self.admin_token.as_deref())?;
        Ok((crate::client::Client::new(&self.broker)?, admin))
    }
}

#[derive(Debug, clap::Args)]
pub struct ExchangeArgs {
    /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
    #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
    broker: String,
    /// File holding the subject token, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    subject_token: String,
    /// The subject token's type URI (default: JWT).
    #[arg(long, value_name = "URI")]
    subject_token_type: Option<String>,
    #[arg(long, value_name = "S")]
    scope: String,
    #[arg(long, value_name = "A")]
    audience: Vec<String>,
    #[arg(long, value_name = "P")]
    purpose: Option<String>,
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Mint into an open task instead of opening a new one.
    #[arg(long, value_name = "T")]
    task_id: Option<String>,
    /// Bind the token to this key with a DPoP proof (RFC 9449): a PKCS#8 PEM private key,
    /// e.g. one `writ keys generate` wrote. The response's `token_type` is then `DPoP`.
    #[arg(long, value_name = "FILE")]
    dpop_key: Option<std::path::PathBuf>,
    /// Repeat a request held for approval (the `approval_id` of `authorization_pending`).
    #[arg(long, value_name = "ID")]
    approval_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DelegateArgs {
    /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
    #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
    broker: String,
    /// File holding the delegation grant, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    grant: String,
    /// File holding the sub-agent's own JWT-SVID or OIDC ID token, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    actor_token: String,
    /// The actor token's type URI (default: JWT).
    #[arg(long, value_name = "URI")]
    actor_token_type: Option<String>,
    /// Scopes, within the grant's.
    #[arg(long, value_name = "S")]
    scope: String,
    /// Audiences, within the parent task's (default: the broker's default audience).
    #[arg(long, value_name = "A")]
    audience: Vec<String>,
    #[arg(long, value_name = "P")]
    purpose: Option<String>,
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// End the task that the token belongs to; all its tokens are revoked.
    End {
        /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
        #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
        broker: String,
        /// File holding a token of the task, or `-` for standard input.
        #[arg(long, value_name = "FILE|-")]
        token: String,
    },
    /// List tasks (admin).
    List {
        /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
        #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
        broker: String,
        /// File holding the admin token, or `-` for standard input (default: the token
        /// itself from $WRIT_ADMIN_TOKEN).
        #[arg(long, value_name = "FILE|-")]
        admin_token: Option<String>,
        /// A subject, or a prefix ending in `/*`.
        #[arg(long)]
        subject: Option<String>,
        /// open, ended or revoked.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show one task's state (admin).
    Get {
        task_id: String,
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("selector").required(true).args(["jti", "task", "subject", "issuer", "all"])))]
pub struct RevokeArgs {
    /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
    #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
    pub broker: String,
    /// File holding the admin token, or `-` for standard input (default: the token
    /// itself from $WRIT_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE|-")]
    pub admin_token: Option<String>,
    #[arg(long, value_name = "J")]
    pub jti: Option<String>,
    #[arg(long, value_name = "T")]
    pub task: Option<String>,
    /// A subject, or a prefix ending in `/*`.
    #[arg(long, value_name = "PATTERN")]
    pub subject: Option<String>,
    /// A trust domain or an OIDC issuer.
    #[arg(long, value_name = "I")]
    pub issuer: Option<String>,
    /// Every token and every exchange (the kill switch).
    #[arg(long)]
    pub all: bool,
    #[arg(long, value_name = "R")]
    pub reason: String,
}

#[derive(Debug, Subcommand)]
pub enum BlocksCommand {
    /// List the standing ones (revocations also while recently lifted).
    List {
        /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
        #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
        broker: String,
        /// File holding the admin token, or `-` for standard input (default: the token
        /// itself from $WRIT_ADMIN_TOKEN).
        #[arg(long, value_name = "FILE|-")]
        admin_token: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Lift one by its id: the subjects it refused may exchange again.
    Lift {
        id: String,
        /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
        #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
        broker: String,
        /// File holding the admin token, or `-` for standard input (default: the token
        /// itself from $WRIT_ADMIN_TOKEN).
        #[arg(long, value_name = "FILE|-")]
        admin_token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List the approval requests the broker keeps (newest first).
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// pending, approved, denied, expired, cancelled or issued.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Approve a held request: its client's next poll gets the token.
    Approve {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deny a held request: its client's next poll gets `access_denied`.
    Deny {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
        /// Why (recorded in the decision log).
        #[arg(long, value_name = "R")]
        reason: Option<String>,
    },
}

/// `writ approvals …`.
async fn approvals_command(command: ApprovalsCommand) -> anyhow::Result<()> {
    match command {
        ApprovalsCommand::List {
            admin,
            state,
            output,
        } => {
            let (client, token) = admin.client()?;
            let out = client.list_approvals(&token, state.as_deref()).await?;
            print_list(&out, "approvals", output::APPROVAL_COLUMNS, output)
        }
        ApprovalsCommand::Approve { id, admin } => {
            let (client, token) = admin.client()?;
            let out = client.decide_approval(&token, &id, None).await?;
            print_record(&out, output::APPROVAL_TIMES, Output::Json)
        }
        ApprovalsCommand::Deny { id, admin, reason } => {
            let (client, token) = admin.client()?;
            let out = client
                .decide_approval(&token, &id, Some(reason.as_deref().unwrap_or("")))
                .await?;
            print_record(&out, output::APPROVAL_TIMES, Output::Json)
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Confirm that the store lost its revocation state (flushed or evicted while no replica
    /// remembered it): replicas waiting for this become ready; what was lost stays lost.
    ConfirmReset {
        /// The broker's base URL, e.g. http://127.0.0.1:8080 (default: $WRIT_BROKER).
        #[arg(long, value_name = "URL", env = "WRIT_BROKER")]
        broker: String,
        /// File holding the admin token, or `-` for standard input (default: the token
        /// itself from $WRIT_ADMIN_TOKEN).
        #[arg(long, value_name = "FILE|-")]
        admin_token: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the decision log's hash chain and signed checkpoints; report the first bad
    /// record (by seq), or a log rewritten or cut at its tail.
    Verify {
        file: PathBuf,
        /// The broker's JWKS (its `/oauth2/jwks` URL, or a file): checkpoint signatures are
        /// checked only with it.
        #[arg(long, value_name = "URL|FILE")]
        jwks: Option<String>,
        /// The broker (its base URL, or its `/admin/v1/audit/head` URL) whose signed head the
        /// log must reach: catches a cut tail.
        #[arg(long, value_name = "URL")]
        head_from: Option<String>,
        /// Admin token for `--head-from`: a file, or `-` for standard input (default: the
        /// token itself from $WRIT_ADMIN_TOKEN).
        #[arg(long, value_name = "FILE|-", requires = "head_from")]
        admin_token: Option<String>,
    },
}

/// `writ revocations …` and `writ quarantines …`: list or lift blocks of one kind.
async fn blocks_command(kind: BlockKind, command: BlocksCommand) -> anyhow::Result<()> {
    match command {
        BlocksCommand::List {
            broker,
            admin_token,
            output,
        } => {
            let admin = admin_secret(admin_token.as_deref())?;
            let out = crate::client::Client::new(&broker)?
                .list_blocks(&admin, kind)
                .await?;
            let (columns, field) = match kind {
                BlockKind::Revocation => (output::REVOCATION_COLUMNS, "revocations"),
                BlockKind::Quarantine => (output::QUARANTINE_COLUMNS, "quarantines"),
            };
            print_list(&out, field, columns, output)
        }
        BlocksCommand::Lift {
            id,
            broker,
            admin_token,
        } => {
            check_lift_id(kind, &id)?;
            let admin = admin_secret(admin_token.as_deref())?;
            let out = crate::client::Client::new(&broker)?
                .lift_block(&admin, kind, &id)
                .await?;
            print_record(&out, output::BLOCK_TIMES, Output::Json)
        }
    }
}

/// An id of the other kind of block is lifted by the other command: say which.
fn check_lift_id(kind: BlockKind, id: &str) -> anyhow::Result<()> {
    match kind {
        BlockKind::Revocation if id.starts_with("qtn_") => anyhow::bail!(
            "`{id}` is a quarantine, not a revocation: lift it with `writ quarantines lift {id}`"
        ),
        BlockKind::Quarantine if id.starts_with("rev_") => anyhow::bail!(
            "`{id}` is a revocation, not a quarantine: lift it with `writ revocations lift {id}`"
        ),
        _ => Ok(()),
    }
}

/// A list the broker answered (`{field: [...]}`): as a table, or its JSON as is.
fn print_list(
    out: &serde_json::Value,
    field: &str,
    columns: &[(&str, &str, bool)],
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(out)?),
        Output::Table => {
            let items = out
                .get(field)
                .and_then(serde_json::Value::as_array)
                .with_context(|| format!("the broker's answer has no `{field}` list"))?;
            print!("{}", output::table(items, columns, output::now()));
        }
    }
    Ok(())
}

/// One record the broker answered: `field  value` lines, or its JSON as is.
fn print_record(out: &serde_json::Value, times: &[&str], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(out)?),
        Output::Table => print!("{}", output::record(out, times, output::now())),
    }
    Ok(())
}

/// Runs a parsed command. Errors are printed by the caller, with a non-zero exit.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let app = Application::build(config).await?;
            let stop = shutdown_signal();
            tracing::info!(addr = %app.local_addr(), "writ listening");
            app.run_until(stop).await
        }
        Command::Dev(args) => match args.command {
            Some(DevCommand::Svid {
                spiffe_id,
                audience,
                ttl,
            }) => {
                let files = DevFiles::new(dev::DEV_DIR);
                println!("{}", dev::mint_svid(&files, &spiffe_id, &audience, ttl)?);
                Ok(())
            }
            None => run_dev(&args.listen).await,
        },
        Command::Config {
            command:
                ConfigCommand::Check {
                    config,
                    syntax_only,
                },
        } => config_check(&config, syntax_only).await,
        Command::Policy { command } => policy_command(command),
        Command::Keys {
            command: KeysCommand::Generate { alg, out, force },
        } => keys_generate(alg, &out, force),
        Command::Token {
            command: TokenCommand::Exchange(args),
        } => token_exchange(args).await,
        Command::Token {
            command: TokenCommand::Delegate(args),
        } => token_delegate(args).await,
        Command::Token {
            command:
                TokenCommand::Introspect {
                    token,
                    admin,
                    output,
                },
        } => token_introspect(&token, &admin, output).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "writ", &mut std::io::stdout());
            Ok(())
        }
        Command::Task { command } => task_command(command).await,
        Command::Revoke(args) => revoke_command(args).await,
        Command::Store {
            command:
                StoreCommand::ConfirmReset {
                    broker,
                    admin_token,
                },
        } => confirm_store_reset(&broker, admin_token.as_deref()).await,
        Command::Revocations { command } => blocks_command(BlockKind::Revocation, command).await,
        Command::Quarantines { command } => blocks_command(BlockKind::Quarantine, command).await,
        Command::Approvals { command } => approvals_command(command).await,
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    jwks,
                    head_from,
                    admin_token,
                },
        } => {
            audit_verify(
                &file,
                jwks.as_deref(),
                head_from.as_deref(),
                admin_token.as_deref(),
            )
            .await
        }
    }
}

fn keys_generate(alg: keys::KeyAlg, out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    keys::generate_into(alg, out, force)?;
    let key = keys::SigningKey::load(out)?;
    println!(
        "wrote {} key {} (kid {})",
        alg.name(),
        out.display(),
        key.kid
    );
    Ok(())
}

async fn confirm_store_reset(broker: &str, admin_token: Option<&str>) -> anyhow::Result<()> {
    let admin = admin_secret(admin_token)?;
    let out = crate::client::Client::new(broker)?
        .confirm_store_reset(&admin)
        .await?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn config_check(config: &std::path::Path, syntax_only: bool) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    if syntax_only {
        println!("config ok (keys and values; files and store not checked)");
        return Ok(());
    }
    let report = crate::broker::check_config(&cfg).await?;
    println!(
        "config ok: {} signing key(s), policy version {}",
        report.signing_keys, report.policy_version
    );
    Ok(())
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { dir } => {
            let set = crate::policy::PolicySet::load_dir(&dir)?;
            println!(
                "{} policies ok, version {}",
                set.policy_count(),
                set.version()
            );
            Ok(())
        }
        PolicyCommand::Test { dir, cases } => {
            let set = crate::policy::PolicySet::load_dir(&dir)?;
            let report = crate::policy::run_cases(&set, &cases)?;
            for f in &report.failures {
                println!("FAIL {f}");
            }
            let failed = report.total - report.passed;
            println!("{} passed, {failed} failed", report.passed);
            if failed > 0 {
                anyhow::bail!("{failed} policy test case(s) failed");
            }
            Ok(())
        }
    }
}

async fn token_exchange(args: ExchangeArgs) -> anyhow::Result<()> {
    let token = secret("--subject-token", &args.subject_token)?;
    let dpop_key = args
        .dpop_key
        .as_deref()
        .map(crate::token::keys::SigningKey::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--dpop-key: {}", crate::error::chain(&e)))?
        .map(std::sync::Arc::new);
    let client = crate::client::Client::new(&args.broker)?;
    let resp = client
        .exchange(&crate::client::ExchangeParams {
            subject_token: token,
            subject_token_type: args.subject_token_type,
            scope: args.scope,
            audience: args.audience,
            purpose: args.purpose,
            ttl: args.ttl,
            task_id: args.task_id,
            actor_token: None,
            approval_id: args.approval_id,
            dpop_key,
        })
        .await?;
    println!("{}", serde_json::to_string_pretty(&resp)?);
    Ok(())
}

async fn token_delegate(args: DelegateArgs) -> anyhow::Result<()> {
    if args.grant == "-" && args.actor_token == "-" {
        anyhow::bail!("only one of --grant and --actor-token can be read from standard input");
    }
    let grant = secret("--grant", &args.grant)?;
    let actor = secret("--actor-token", &args.actor_token)?;
    let client = crate::client::Client::new(&args.broker)?;
    let resp = client
        .exchange(&crate::client::ExchangeParams {
            subject_token: grant,
            subject_token_type: Some(crate::exchange::TYPE_ACCESS_TOKEN.to_string()),
            scope: args.scope,
            audience: args.audience,
            purpose: args.purpose,
            ttl: args.ttl,
            task_id: None,
            actor_token: Some((
                actor,
                args.actor_token_type
                    .unwrap_or_else(|| crate::exchange::TYPE_JWT.to_string()),
            )),
            approval_id: None,
            dpop_key: None,
        })
        .await?;
    println!("{}", serde_json::to_string_pretty(&resp)?);
    Ok(())
}

async fn task_command(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::End { broker, token } => {
            let token = secret("--token", &token)?;
            let out = crate::client::Client::new(&broker)?
                .end_task(&token)
                .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        TaskCommand::List {
            broker,
            admin_token,
            subject,
            state,
            output,
        } => {
            let admin = admin_secret(admin_token.as_deref())?;
            let out = crate::client::Client::new(&broker)?
                .list_tasks(&admin, subject.as_deref(), state.as_deref())
                .await?;
            print_list(&out, "tasks", output::TASK_COLUMNS, output)
        }
        TaskCommand::Get {
            task_id,
            admin,
            output,
        } => {
            let (client, secret) = admin.client()?;
            let out = client.get_task(&secret, &task_id).await?;
            print_record(&out, output::TASK_TIMES, output)
        }
    }
}

/// `writ token introspect`: the broker's answer, and exit status 2 for an inactive token.
async fn token_introspect(token: &str, admin: &AdminArgs, output: Output) -> anyhow::Result<()> {
    let token = secret("TOKEN_FILE", token)?;
    let (client, secret) = admin.client()?;
    let out = client.introspect(&secret, &token).await?;
    print_record(&out, &["exp", "iat", "nbf"], output)?;
    if out.get("active") == Some(&serde_json::Value::Bool(true)) {
        Ok(())
    } else {
        Err(TokenInactive.into())
    }
}

async fn revoke_command(args: RevokeArgs) -> anyhow::Result<()> {
    let admin = admin_secret(args.admin_token.as_deref())?;
    let selector = if let Some(j) = args.jti {
        serde_json::json!({"jti": j})
    } else if let Some(t) = args.task {
        serde_json::json!({"task_id": t})
    } else if let Some(s) = args.subject {
        serde_json::json!({"subject": s})
    } else if let Some(i) = args.issuer {
        serde_json::json!({"issuer": i})
    } else {
        serde_json::json!({"all": true})
    };
    let out = crate::client::Client::new(&args.broker)?
        .revoke(&admin, selector, &args.reason)
        .await?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `writ audit verify`.
async fn audit_verify(
    file: &std::path::Path,
    jwks: Option<&str>,
    head_from: Option<&str>,
    admin_token: Option<&str>,
) -> anyhow::Result<()> {
    let keys = match jwks {
        None => None,
        Some(src) => {
            let bytes = if src.starts_with("https://") || src.starts_with("http://") {
                let v = crate::client::Client::for_documents()?
                    .get_json(src)
                    .await
                    .with_context(|| format!("fetching the JWKS from `{src}`"))?;
                serde_json::to_vec(&v)?
            } else {
                std::fs::read(src).with_context(|| format!("reading the JWKS `{src}`"))?
            };
            let keys = CheckpointKeys::from_jwks(&bytes)
                .map_err(|e| anyhow::anyhow!("the JWKS `{src}`: {e}"))?;
            Some(keys)
        }
    };
    let head: Option<AuditHead> = match head_from {
        Some(url) => {
            let admin = admin_secret(admin_token)?;
            let base = url
                .trim_end_matches('/')
                .trim_end_matches("/admin/v1/audit/head");
            let v = crate::client::Client::new(base)?
                .audit_head(&admin)
                .await
                .with_context(|| format!("fetching the decision log head from `{url}`"))?;
            Some(
                serde_json::from_value(v)
                    .context("the broker's head is not {log_id, seq, hash, checkpoint}")?,
            )
        }
        None => None,
    };
    let opts = VerifyOptions {
        keys: keys.as_ref(),
        head: head.as_ref(),
    };
    let f = std::fs::File::open(file).with_context(|| format!("reading `{}`", file.display()))?;
    let report = match crate::audit::verify_reader(f, opts)
        .with_context(|| format!("reading `{}`", file.display()))?
    {
        Verification::Intact(r) => r,
        Verification::Broken(b) => {
            anyhow::bail!("broken at seq {} (line {}): {}", b.seq, b.line, b.reason)
        }
    };
    println!("ok: {} records, chain intact", report.records);
    let signatures = if report.signatures_checked {
        "signatures verified with the JWKS"
    } else {
        "signatures NOT verified (pass --jwks)"
    };
    println!("checkpoints: {}, {signatures}", report.checkpoints);
    // The checkpoint record follows the record it covers.
    let after = report.last_checkpointed.map_or(1, |covered| covered + 2);
    if after <= report.last_seq {
        let one = after == report.last_seq;
        println!(
            "{} {} after the last checkpoint: only the hash chain protects {}",
            crate::audit::verify::span(after, report.last_seq),
            if one { "comes" } else { "come" },
            if one { "it" } else { "them" }
        );
    }
    match report.head_seq {
        Some(h) => println!("head: the log reaches the broker's signed head at seq {h}"),
        None => println!("head: not checked (pass --head-from to catch a cut tail)"),
    }
    Ok(())
}

/// Reads a secret from the file named by `flag`, or standard input for `-`. The value given
/// is never shown, not even in an error: it may be the secret itself, pasted by mistake.
fn secret(flag: &str, source: &str) -> anyhow::Result<String> {
    crate::client::read_secret(source).map_err(|e| {
        if looks_like_secret(source) {
            let hint = if flag == "--admin-token" {
                ", or set WRIT_ADMIN_TOKEN to the token itself"
            } else {
                ""
            };
            anyhow::anyhow!(
                "the value of {flag} looks like a secret, not a file name: pass the name of a \
                 file holding it, or - to read it from standard input{hint}"
            )
        } else {
            anyhow::anyhow!(
                "the file named by {flag} could not be read: {}",
                io_reason(&e)
            )
        }
    })
}

/// The admin token: from the file named by `--admin-token`, else `WRIT_ADMIN_TOKEN`.
fn admin_secret(file: Option<&str>) -> anyhow::Result<String> {
    if let Some(f) = file {
        return secret("--admin-token", f);
    }
    match std::env::var("WRIT_ADMIN_TOKEN") {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => anyhow::bail!(
            "an admin token is needed: pass --admin-token FILE (or - for standard input), or \
             set WRIT_ADMIN_TOKEN to the token"
        ),
    }
}

/// A value that is no file name: long, without a folder separator.
fn looks_like_secret(value: &str) -> bool {
    value.len() >= 24 && !value.contains(['/', '\\'])
}

/// Why a file could not be read, without its name or content.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        std::io::ErrorKind::IsADirectory => "it is a folder".to_string(),
        std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_string(),
        kind => kind.to_string(),
    }
}

async fn run_dev(listen: &str) -> anyhow::Result<()> {
    let files = DevFiles::new(dev::DEV_DIR);
    dev::ensure_not_running(&files, listen)?;
    let admin = dev::prepare(&files, listen)?;
    let config = Config::load(&files.config())?;
    let app = Application::build(config).await?;
    let base = format!("http://{}", app.local_addr());
    let svid = dev::mint_svid(
        &files,
        dev::DEMO_SPIFFE_ID,
        dev::DEV_AUDIENCE,
        Duration::from_secs(3600),
    )?;
    keys::write_private(&files.demo_svid(), svid.as_bytes())?;
    let stop = shutdown_signal();
    // A closed stdout (a reader that went away) must not take the broker down.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", dev::banner(&files, &base, &admin, &svid))
            .and_then(|_| out.flush());
    }
    app.run_until(stop).await
}
