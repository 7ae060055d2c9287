//! accordion-cri: a crictl-like Kubernetes CRI v1 client for tests, over containerd's Unix socket
//! (Debian packages no cri-tools).
//!
//! ```text
//! accordion-cri runp [--runtime NAME] pod.json               # prints the pod id
//! accordion-cri create POD_ID container.json pod.json        # prints the container id
//! accordion-cri start ID
//! accordion-cri exec [--timeout S] ID -- cmd args…           # the command's stdout, stderr, status
//! accordion-cri update [--cpu-quota N] [--cpu-period N] [--cpu-shares N] [--memory BYTES]
//!                      [--cpuset-cpus S] [--cpuset-mems S] ID
//! accordion-cri inspect ID | inspectp ID                     # status (verbose) as JSON
//! accordion-cri ps [-a] [--pod ID] | pods | images | version
//! accordion-cri stop [--timeout S] ID | rm ID | stopp ID | rmp ID
//! ```
//!
//! `--endpoint` (or CONTAINER_RUNTIME_ENDPOINT) names the socket; `--timeout` (before the
//! subcommand) is each call's deadline, 120 s by default because the emulated node is slow. A
//! failed call prints `accordion-cri: Rpc: rpc error: code = Code desc = message` on stderr and
//! exits 1; `exec` exits with the command's own status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use accordion_tests::cri::{config, pb, view, Cri, CriError, DEFAULT_ENDPOINT};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "accordion-cri",
    version,
    about = "A crictl-like Kubernetes CRI v1 client for Accordion's tests"
)]
struct Cli {
    /// CRI endpoint: unix:///path or /path.
    #[arg(long, env = "CONTAINER_RUNTIME_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// Deadline of each call in seconds (calls that wait, such as exec and stop, get their own
    /// wait on top).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pod sandbox from a pod.json (RunPodSandbox); prints its id.
    Runp {
        /// Runtime handler (a runtime name in containerd's CRI config); containerd's default if unset.
        #[arg(long, value_name = "NAME")]
        runtime: Option<String>,
        pod: PathBuf,
    },
    /// Create a container in a pod from a container.json and the pod's pod.json; prints its id.
    Create {
        pod_id: String,
        container: PathBuf,
        pod: PathBuf,
    },
    /// Start a created container.
    Start { id: String },
    /// Run a command in a container and wait for it (ExecSync); exits with its status.
    Exec {
        /// Seconds the runtime lets the command run (0: no limit).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        timeout: u64,
        id: String,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Update a container's Linux resources (UpdateContainerResources); unset values stay as they are.
    Update {
        #[arg(long, value_name = "N")]
        cpu_quota: Option<i64>,
        #[arg(long, value_name = "N")]
        cpu_period: Option<i64>,
        #[arg(long, value_name = "N")]
        cpu_shares: Option<i64>,
        /// Memory limit in bytes.
        #[arg(long, value_name = "BYTES")]
        memory: Option<i64>,
        #[arg(long, value_name = "CPUS")]
        cpuset_cpus: Option<String>,
        #[arg(long, value_name = "MEMS")]
        cpuset_mems: Option<String>,
        id: String,
    },
    /// A container's status and verbose info, as JSON.
    Inspect { id: String },
    /// A pod sandbox's status and verbose info, as JSON.
    Inspectp { id: String },
    /// List containers: id, name, state, pod id (running ones unless -a).
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Only the containers of this pod.
        #[arg(long, value_name = "POD_ID")]
        pod: Option<String>,
    },
    /// List pod sandboxes: id, name, namespace, state, runtime handler.
    Pods,
    /// List images: reference, id.
    Images,
    /// Stop a container, killing it after the grace period.
    Stop {
        /// Grace period in seconds between SIGTERM and SIGKILL.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        timeout: u64,
        id: String,
    },
    /// Remove a container.
    Rm { id: String },
    /// Stop a pod sandbox and its containers.
    Stopp { id: String },
    /// Remove a pod sandbox.
    Rmp { id: String },
    /// The runtime's name and versions.
    Version,
}

/// A failure of accordion-cri itself (as opposed to an exec'd command's status).
#[derive(Debug)]
enum Error {
    Cri(CriError),
    Config(config::ConfigError),
    Usage(String),
    Io(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Cri(e) => e.fmt(f),
            Error::Config(e) => e.fmt(f),
            Error::Usage(e) => f.write_str(e),
            Error::Io(e) => write!(f, "cannot write the output: {e}"),
        }
    }
}

impl From<CriError> for Error {
    fn from(e: CriError) -> Self {
        Error::Cri(e)
    }
}

impl From<config::ConfigError> for Error {
    fn from(e: config::ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("accordion-cri: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("accordion-cri: {e}");
            ExitCode::FAILURE
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A CRI duration field (int64 seconds) from a command-line value.
fn cri_secs(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    // Files and arguments are checked before connecting: a bad file or an empty update is
    // reported as such even with no runtime.
    let cmd = cli.cmd;
    let (pod_config, container_config) = match &cmd {
        Cmd::Runp { pod, .. } => (Some(config::load_pod_config(pod)?), None),
        Cmd::Create { container, pod, .. } => (
            Some(config::load_pod_config(pod)?),
            Some(config::load_container_config(container)?),
        ),
        Cmd::Update {
            cpu_quota: None,
            cpu_period: None,
            cpu_shares: None,
            memory: None,
            cpuset_cpus: None,
            cpuset_mems: None,
            ..
        } => {
            return Err(Error::Usage(
                "update: nothing to update (give --cpu-quota, --cpu-period, --cpu-shares, \
                 --memory, --cpuset-cpus or --cpuset-mems)"
                    .into(),
            ))
        }
        _ => (None, None),
    };
    let cri = Cri::connect(&cli.endpoint, secs(cli.timeout)).await?;
    let mut rt = cri.runtime.clone();
    let mut images = cri.image.clone();
    let none = Duration::ZERO;
    let mut out = std::io::stdout().lock();
    match cmd {
        Cmd::Runp { runtime, .. } => {
            let request = pb::RunPodSandboxRequest {
                config: pod_config,
                runtime_handler: runtime.unwrap_or_default(),
            };
            let r = cri
                .call(
                    "RunPodSandbox",
                    none,
                    rt.run_pod_sandbox(cri.request(request, none)),
                )
                .await?;
            writeln!(out, "{}", r.pod_sandbox_id)?;
        }
        Cmd::Create { pod_id, .. } => {
            let request = pb::CreateContainerRequest {
                pod_sandbox_id: pod_id,
                config: container_config,
                sandbox_config: pod_config,
            };
            let r = cri
                .call(
                    "CreateContainer",
                    none,
                    rt.create_container(cri.request(request, none)),
                )
                .await?;
            writeln!(out, "{}", r.container_id)?;
        }
        Cmd::Start { id } => {
            let request = pb::StartContainerRequest {
                container_id: id.clone(),
            };
            cri.call(
                "StartContainer",
                none,
                rt.start_container(cri.request(request, none)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Exec {
            timeout,
            id,
            cmd: argv,
        } => {
            let request = pb::ExecSyncRequest {
                container_id: id,
                cmd: argv,
                timeout: cri_secs(timeout),
            };
            let wait = secs(timeout);
            let r = cri
                .call("ExecSync", wait, rt.exec_sync(cri.request(request, wait)))
                .await?;
            out.write_all(&r.stdout)?;
            out.flush()?;
            std::io::stderr().write_all(&r.stderr)?;
            // Statuses outside 0..=255 (a runtime's own codes) still read as failures.
            return Ok(ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255)));
        }
        Cmd::Update {
            cpu_quota,
            cpu_period,
            cpu_shares,
            memory,
            cpuset_cpus,
            cpuset_mems,
            id,
        } => {
            // Zero (unset) fields are left unchanged by the runtime.
            let request = pb::UpdateContainerResourcesRequest {
                container_id: id.clone(),
                linux: Some(pb::LinuxContainerResources {
                    cpu_quota: cpu_quota.unwrap_or_default(),
                    cpu_period: cpu_period.unwrap_or_default(),
                    cpu_shares: cpu_shares.unwrap_or_default(),
                    memory_limit_in_bytes: memory.unwrap_or_default(),
                    cpuset_cpus: cpuset_cpus.unwrap_or_default(),
                    cpuset_mems: cpuset_mems.unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            cri.call(
                "UpdateContainerResources",
                none,
                rt.update_container_resources(cri.request(request, none)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Inspect { id } => {
            let request = pb::ContainerStatusRequest {
                container_id: id,
                verbose: true,
            };
            let r = cri
                .call(
                    "ContainerStatus",
                    none,
                    rt.container_status(cri.request(request, none)),
                )
                .await?;
            print_json(&mut out, &view::container_status(&r))?;
        }
        Cmd::Inspectp { id } => {
            let request = pb::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            };
            let r = cri
                .call(
                    "PodSandboxStatus",
                    none,
                    rt.pod_sandbox_status(cri.request(request, none)),
                )
                .await?;
            print_json(&mut out, &view::pod_status(&r))?;
        }
        Cmd::Ps { all, pod } => {
            let filter = pb::ContainerFilter {
                state: (!all).then_some(pb::ContainerStateValue {
                    state: pb::ContainerState::ContainerRunning as i32,
                }),
                pod_sandbox_id: pod.unwrap_or_default(),
                ..Default::default()
            };
            let request = pb::ListContainersRequest {
                filter: Some(filter),
            };
            let mut r = cri
                .call(
                    "ListContainers",
                    none,
                    rt.list_containers(cri.request(request, none)),
                )
                .await?;
            r.containers.sort_by_key(|c| c.created_at);
            for c in r.containers {
                let name = c.metadata.map(|m| m.name).unwrap_or_default();
                let state = view::container_state_name(c.state);
                writeln!(out, "{}\t{name}\t{state}\t{}", c.id, c.pod_sandbox_id)?;
            }
        }
        Cmd::Pods => {
            let request = pb::ListPodSandboxRequest { filter: None };
            let mut r = cri
                .call(
                    "ListPodSandbox",
                    none,
                    rt.list_pod_sandbox(cri.request(request, none)),
                )
                .await?;
            r.items.sort_by_key(|p| p.created_at);
            for p in r.items {
                let (name, namespace) = p
                    .metadata
                    .map(|m| (m.name, m.namespace))
                    .unwrap_or_default();
                let state = view::pod_state_name(p.state);
                let handler = if p.runtime_handler.is_empty() {
                    "-".to_owned()
                } else {
                    p.runtime_handler
                };
                writeln!(out, "{}\t{name}\t{namespace}\t{state}\t{handler}", p.id)?;
            }
        }
        Cmd::Images => {
            let request = pb::ListImagesRequest { filter: None };
            let r = cri
                .call(
                    "ListImages",
                    none,
                    images.list_images(cri.request(request, none)),
                )
                .await?;
            for image in r.images {
                for tag in &image.repo_tags {
                    writeln!(out, "{tag}\t{}", image.id)?;
                }
            }
        }
        Cmd::Stop { timeout, id } => {
            let request = pb::StopContainerRequest {
                container_id: id.clone(),
                timeout: cri_secs(timeout),
            };
            let wait = secs(timeout);
            cri.call(
                "StopContainer",
                wait,
                rt.stop_container(cri.request(request, wait)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Rm { id } => {
            let request = pb::RemoveContainerRequest {
                container_id: id.clone(),
            };
            cri.call(
                "RemoveContainer",
                none,
                rt.remove_container(cri.request(request, none)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Stopp { id } => {
            let request = pb::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            cri.call(
                "StopPodSandbox",
                none,
                rt.stop_pod_sandbox(cri.request(request, none)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Rmp { id } => {
            let request = pb::RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            };
            cri.call(
                "RemovePodSandbox",
                none,
                rt.remove_pod_sandbox(cri.request(request, none)),
            )
            .await?;
            writeln!(out, "{id}")?;
        }
        Cmd::Version => {
            let request = pb::VersionRequest {
                version: "v1".into(),
            };
            let r = cri
                .call("Version", none, rt.version(cri.request(request, none)))
                .await?;
            writeln!(out, "Version: {}", r.version)?;
            writeln!(out, "RuntimeName: {}", r.runtime_name)?;
            writeln!(out, "RuntimeVersion: {}", r.runtime_version)?;
            writeln!(out, "RuntimeApiVersion: {}", r.runtime_api_version)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(out: &mut impl Write, value: &serde_json::Value) -> Result<(), Error> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn test_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_exec_takes_the_command_after_double_dash_with_its_options() {
        let cli = Cli::try_parse_from([
            "accordion-cri",
            "--timeout",
            "60",
            "exec",
            "--timeout",
            "5",
            "c1",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();

        assert_eq!(cli.timeout, 60);
        let Cmd::Exec { timeout, id, cmd } = cli.cmd else {
            panic!("not exec");
        };
        assert_eq!((timeout, id.as_str()), (5, "c1"));
        assert_eq!(cmd, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn test_exec_without_a_command_is_a_usage_error() {
        assert!(Cli::try_parse_from(["accordion-cri", "exec", "c1"]).is_err());
    }
}
