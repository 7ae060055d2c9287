//! `/etc/accordion/config.toml`: host-wide defaults for sandboxes (the shim reads it at start, the
//! CLI with `--config`). Every key is optional and has the default documented in
//! docs/configuration.md; unknown keys and bad values are errors naming the key, so a typo never
//! silently falls back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the configuration lives unless told otherwise (`ACCORDION_CONFIG` overrides it).
pub const DEFAULT_PATH: &str = "/etc/accordion/config.toml";
/// The most vCPUs a VM can have (the VMM's address map and KVM's arm64 limit).
pub const VCPU_LIMIT: u32 = 512;
/// Less guest memory than this cannot boot the agent.
pub const MIN_MEMORY_MIB: u64 = 128;
/// The most guest memory a VM can have (the VMM's address map).
pub const MAX_MEMORY_MIB: u64 = accordion_vmm::config::MAX_MEMORY_MIB;
/// Bounds of `console.max_kib`: enough for the tail an error message shows, and at most what a
/// pod may take of /run (a tmpfs every pod and containerd share).
pub const CONSOLE_MIN_KIB: u64 = 64;
pub const CONSOLE_MAX_KIB: u64 = 256 * 1024;
/// Bounds of `host.memory_overhead_mib`: below 32 MiB the VMM itself is OOM-killed.
const MIN_HOST_OVERHEAD_MIB: u64 = 32;
const MAX_HOST_OVERHEAD_MIB: u64 = 65_536;
/// Threads a sandbox has on the host beside its vCPUs (tokio's workers and blocking pool, device
/// back ends, virtiofsd), for the lower bound of `host.pids_max`.
const HOST_THREADS_BESIDE_VCPUS: u64 = 128;
const MAX_PIDS: u64 = 1 << 22;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Invalid configuration in {0}: {1}")]
    Parse(PathBuf, String),
    #[error("Invalid configuration in {path}: {key} = {value}: {why}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: String,
    },
}

/// How a pod's CPU requests and limits become a vCPU count (the resize controller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SizingPolicy {
    /// Each container's limit, or its request where it has no limit.
    LimitsThenRequests,
    /// Limits only; containers without a limit count as nothing.
    Limits,
    /// Requests only.
    Requests,
}

/// The guest's kernel and initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the VMM's kernel command line.
    pub kernel_params: String,
}

impl Default for GuestConfig {
    fn default() -> Self {
        // The installed guest assets (`ACCORDION_SHARE_DIR` moves them, e.g. for tests).
        let guest = crate::sandbox::share_dir().join("guest");
        Self {
            kernel: guest.join("Image"),
            initrd: guest.join("agent-initrd.cpio"),
            kernel_params: String::new(),
        }
    }
}

/// vCPU sizing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VcpuConfig {
    /// vCPUs of a sandbox whose pod says nothing about CPU.
    pub default: u32,
    /// Fewest vCPUs a sandbox is ever sized to.
    pub min: u32,
    /// Possible vCPUs of every sandbox: the most it can grow to.
    pub max: u32,
    pub sizing_policy: SizingPolicy,
}

impl Default for VcpuConfig {
    fn default() -> Self {
        Self {
            default: 1,
            min: 1,
            max: 64,
            sizing_policy: SizingPolicy::LimitsThenRequests,
        }
    }
}

/// Guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// MiB of a sandbox whose pod sets no memory limit.
    pub default_mib: u64,
    /// The most guest memory a sandbox may grow to by a memory resize (virtio-mem), MiB; 0, or
    /// not above a sandbox's boot memory: its memory stays as booted.
    pub max_mib: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            default_mib: 512,
            max_mib: 0,
        }
    }
}

/// The guest's serial console log (`/run/accordion/<name>/console.log` and `console.log.1`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// KiB both files may take together; the oldest half is dropped beyond it.
    pub max_kib: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self { max_kib: 4096 }
    }
}

/// Deadlines, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// VM start → agent answering.
    pub agent_ready_secs: u64,
    /// One agent call.
    pub agent_call_secs: u64,
    /// One container call of the shim to the agent (create, start, delete, exec start): these
    /// mount, fork and exec in the guest, slow under load.
    pub container_call_secs: u64,
    /// A resize waiting for the guest's acknowledgement.
    pub resize_secs: u64,
    /// A stop waiting for the guest to power off before forcing it.
    pub stop_grace_secs: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            agent_ready_secs: 120,
            agent_call_secs: 10,
            container_call_secs: 60,
            resize_secs: 60,
            stop_grace_secs: 10,
        }
    }
}

/// How the cache of virtiofsd behaves (its `--cache` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsCache {
    Never,
    Metadata,
    Auto,
    Always,
}

impl FsCache {
    /// The value of virtiofsd's `--cache`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Metadata => "metadata",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

/// virtiofsd, run by the shim once per pod to share the containers' root filesystems and volumes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtiofsdConfig {
    pub path: PathBuf,
    pub cache: FsCache,
}

impl Default for VirtiofsdConfig {
    fn default() -> Self {
        Self {
            // Where Debian's virtiofsd package installs it.
            path: PathBuf::from("/usr/libexec/virtiofsd"),
            cache: FsCache::Auto,
        }
    }
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// As the `log` crate's filter (the shim logs through `log`).
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

/// What a sandbox may use on the host beyond its guest (its host cgroup; docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// memory.max of a sandbox's host cgroup is its guest RAM plus this, MiB: the VMM's own
    /// memory, virtiofsd, page tables and vCPU stacks.
    pub memory_overhead_mib: u64,
    /// pids.max of a sandbox's host cgroup: every thread of the VMM and virtiofsd counts.
    pub pids_max: u64,
    /// The host uids (and gids) jailed VMM processes run as: `vmm_ids` of them from
    /// `vmm_id_base`, one per running sandbox (docs/security.md, "The VMM's jail").
    pub vmm_id_base: u32,
    pub vmm_ids: u32,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            memory_overhead_mib: 96,
            pids_max: 1024,
            vmm_id_base: crate::vmm_process::jail::ID_BASE,
            vmm_ids: crate::vmm_process::jail::ID_COUNT,
        }
    }
}

/// The most `host.vmm_ids`: more sandboxes than a node runs, and lock files the lease scan reads.
pub const MAX_VMM_IDS: u32 = 65_536;
/// The lowest `host.vmm_id_base`: below it are the ids distributions give users and services.
pub const MIN_VMM_ID_BASE: u32 = 65_536;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub guest: GuestConfig,
    pub vcpus: VcpuConfig,
    pub memory: MemoryConfig,
    pub timeouts: TimeoutConfig,
    pub virtiofsd: VirtiofsdConfig,
    pub host: HostConfig,
    pub console: ConsoleConfig,
    pub log_level: LogLevel,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            guest: GuestConfig::default(),
            vcpus: VcpuConfig::default(),
            memory: MemoryConfig::default(),
            timeouts: TimeoutConfig::default(),
            virtiofsd: VirtiofsdConfig::default(),
            host: HostConfig::default(),
            console: ConsoleConfig::default(),
            log_level: LogLevel::Info,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file means every default.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError::Read(path.to_owned(), e)),
        }
    }

    /// The configuration at `ACCORDION_CONFIG`, else the default path.
    pub fn load_default() -> Result<Self, ConfigError> {
        let path = std::env::var_os("ACCORDION_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        Self::load(&path)
    }

    /// Parses and checks `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: String, why: String| ConfigError::Value {
            path: path.to_owned(),
            key,
            value,
            why,
        };
        let v = &self.vcpus;
        if v.max == 0 || v.max > VCPU_LIMIT {
            return Err(bad(
                "vcpus.max",
                v.max.to_string(),
                format!("must be 1 to {VCPU_LIMIT}"),
            ));
        }
        if v.min == 0 || v.min > v.max {
            return Err(bad(
                "vcpus.min",
                v.min.to_string(),
                format!("must be 1 to vcpus.max ({})", v.max),
            ));
        }
        if v.default < v.min || v.default > v.max {
            return Err(bad(
                "vcpus.default",
                v.default.to_string(),
                format!("must be vcpus.min ({}) to vcpus.max ({})", v.min, v.max),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory.default_mib) {
            return Err(bad(
                "memory.default_mib",
                self.memory.default_mib.to_string(),
                format!("must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"),
            ));
        }
        if self.memory.max_mib > MAX_MEMORY_MIB {
            return Err(bad(
                "memory.max_mib",
                self.memory.max_mib.to_string(),
                format!("must be 0 (memory stays as booted) to {MAX_MEMORY_MIB}"),
            ));
        }
        if !(CONSOLE_MIN_KIB..=CONSOLE_MAX_KIB).contains(&self.console.max_kib) {
            return Err(bad(
                "console.max_kib",
                self.console.max_kib.to_string(),
                format!("must be {CONSOLE_MIN_KIB} to {CONSOLE_MAX_KIB}"),
            ));
        }
        let h = &self.host;
        if !(MIN_HOST_OVERHEAD_MIB..=MAX_HOST_OVERHEAD_MIB).contains(&h.memory_overhead_mib) {
            return Err(bad(
                "host.memory_overhead_mib",
                h.memory_overhead_mib.to_string(),
                format!("must be {MIN_HOST_OVERHEAD_MIB} to {MAX_HOST_OVERHEAD_MIB}"),
            ));
        }
        // Every possible vCPU may have a thread, beside the VMM's and virtiofsd's own.
        let min_pids = u64::from(v.max) + HOST_THREADS_BESIDE_VCPUS;
        if h.pids_max < min_pids || h.pids_max > MAX_PIDS {
            return Err(bad(
                "host.pids_max",
                h.pids_max.to_string(),
                format!(
                    "must be vcpus.max + {HOST_THREADS_BESIDE_VCPUS} ({min_pids}) to {MAX_PIDS}"
                ),
            ));
        }
        let ids_end = u64::from(h.vmm_id_base) + u64::from(h.vmm_ids);
        if h.vmm_id_base < MIN_VMM_ID_BASE || ids_end > u64::from(u32::MAX) {
            return Err(bad(
                "host.vmm_id_base",
                h.vmm_id_base.to_string(),
                format!(
                    "must be at least {MIN_VMM_ID_BASE}, with host.vmm_ids ids above it below {}",
                    u32::MAX
                ),
            ));
        }
        if h.vmm_ids == 0 || h.vmm_ids > MAX_VMM_IDS {
            return Err(bad(
                "host.vmm_ids",
                h.vmm_ids.to_string(),
                format!("must be 1 to {MAX_VMM_IDS}"),
            ));
        }
        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.agent_ready_secs", t.agent_ready_secs),
            ("timeouts.agent_call_secs", t.agent_call_secs),
            ("timeouts.container_call_secs", t.container_call_secs),
            ("timeouts.resize_secs", t.resize_secs),
        ] {
            if value == 0 {
                return Err(bad(key, "0".into(), "must be at least 1".into()));
            }
        }
        for (key, file) in [
            ("guest.kernel", &self.guest.kernel),
            ("guest.initrd", &self.guest.initrd),
            ("virtiofsd.path", &self.virtiofsd.path),
        ] {
            if !file.is_absolute() {
                return Err(bad(
                    key,
                    file.display().to_string(),
                    "must be an absolute path".into(),
                ));
            }
        }
        Ok(())
    }

    /// The resize deadline.
    pub fn resize_timeout(&self) -> Duration {
        Duration::from_secs(self.timeouts.resize_secs)
    }

    /// The cap of a sandbox's console log, bytes (`max_kib` is bounded by `validate`).
    pub fn console_max_bytes(&self) -> u64 {
        self.console.max_kib.saturating_mul(1024)
    }
}

/// Parses a memory size: a number of MiB, or with a K/M/G suffix (binary units; `Ki`/`Mi`/`Gi`
/// as Kubernetes writes them too).
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let s = s.strip_suffix('i').unwrap_or(s);
    let (num, mult_kib) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024),
        Some('G' | 'g') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1024),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 512M or 2G"))?;
    let kib = n
        .checked_mul(mult_kib)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if kib % 1024 != 0 || kib == 0 {
        return Err(format!("size {s:?} must be a positive whole number of MiB"));
    }
    Ok(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/accordion/config.toml"), text)
    }

    #[test]
    fn test_empty_file_is_every_default() {
        assert_eq!(parse("").expect("empty"), Config::default());
    }

    #[test]
    fn test_every_key_parses() {
        let c = parse(
            r#"
log_level = "debug"
[guest]
kernel = "/k/Image"
initrd = "/k/initrd.cpio"
kernel_params = "loglevel=4"
[vcpus]
default = 2
min = 1
max = 16
sizing_policy = "requests"
[memory]
default_mib = 1024
max_mib = 4096
[console]
max_kib = 1024
[timeouts]
agent_ready_secs = 30
agent_call_secs = 5
resize_secs = 20
stop_grace_secs = 3
[host]
memory_overhead_mib = 128
pids_max = 2048
vmm_id_base = 100000
vmm_ids = 10
"#,
        )
        .expect("full file");
        assert_eq!(c.vcpus.max, 16);
        assert_eq!(c.vcpus.sizing_policy, SizingPolicy::Requests);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.resize_timeout(), Duration::from_secs(20));
        assert_eq!(c.guest.kernel, PathBuf::from("/k/Image"));
        assert_eq!(
            c.host,
            HostConfig {
                memory_overhead_mib: 128,
                pids_max: 2048,
                vmm_id_base: 100_000,
                vmm_ids: 10,
            }
        );
        assert_eq!(c.console_max_bytes(), 1024 * 1024);
        assert_eq!((c.memory.default_mib, c.memory.max_mib), (1024, 4096));
    }

    #[test]
    fn test_unknown_key_is_an_error_naming_it() {
        let err = parse("[vcpus]\nmaximum = 8\n").expect_err("typo");
        assert!(err.to_string().contains("maximum"), "{err}");
        let err = parse("colour = 1\n").expect_err("unknown top-level key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn test_bad_values_name_the_key() {
        for (text, key) in [
            ("[vcpus]\nmax = 0\n", "vcpus.max"),
            ("[vcpus]\nmax = 513\n", "vcpus.max"),
            ("[vcpus]\nmin = 9\nmax = 8\n", "vcpus.min"),
            ("[vcpus]\ndefault = 9\nmax = 8\n", "vcpus.default"),
            ("[memory]\ndefault_mib = 64\n", "memory.default_mib"),
            ("[memory]\ndefault_mib = 1048577\n", "memory.default_mib"),
            ("[memory]\nmax_mib = 1048577\n", "memory.max_mib"),
            ("[console]\nmax_kib = 63\n", "console.max_kib"),
            ("[console]\nmax_kib = 262145\n", "console.max_kib"),
            ("[timeouts]\nresize_secs = 0\n", "timeouts.resize_secs"),
            ("[guest]\nkernel = \"Image\"\n", "guest.kernel"),
            (
                "[host]\nmemory_overhead_mib = 8\n",
                "host.memory_overhead_mib",
            ),
            ("[host]\npids_max = 100\n", "host.pids_max"),
            ("[host]\nvmm_id_base = 0\n", "host.vmm_id_base"),
            ("[host]\nvmm_id_base = 4294967290\n", "host.vmm_id_base"),
            ("[host]\nvmm_ids = 0\n", "host.vmm_ids"),
            (
                "[vcpus]\nmax = 512\n[host]\npids_max = 600\n",
                "host.pids_max",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        assert!(parse("[vcpus]\nsizing_policy = \"most\"\n").is_err());
        assert!(parse("[vcpus]\nmax = -1\n").is_err());
        assert!(parse("[console]\nmax_kib = -1\n").is_err());
        assert!(parse("[console]\nmax_kib = 18446744073709551615\n").is_err());
        assert!(parse("log_level = \"loud\"\n").is_err());
    }

    #[test]
    fn test_missing_file_is_defaults_and_unreadable_is_an_error() {
        let missing = Path::new("/nonexistent/accordion/config.toml");
        assert_eq!(Config::load(missing).expect("missing"), Config::default());
        let dir = std::env::temp_dir();
        assert!(matches!(Config::load(&dir), Err(ConfigError::Read(..))));
    }

    #[test]
    fn test_parse_size_mib_units() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("2048K"), Ok(2));
        assert_eq!(parse_size_mib("2Gi"), Ok(2048));
        assert_eq!(parse_size_mib("768Mi"), Ok(768));
    }

    #[test]
    fn test_parse_size_mib_rejects_garbage_zero_and_fractions() {
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("2ii").is_err());
        assert!(parse_size_mib("i").is_err());
        assert!(parse_size_mib("0M").is_err());
        assert!(parse_size_mib("100K").is_err());
        assert!(parse_size_mib("99999999999999999G").is_err());
    }
}
