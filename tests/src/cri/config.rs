//! crictl's JSON files — `pod.json` (a CRI `PodSandboxConfig`) and `container.json` (a
//! `ContainerConfig`) — parsed into our own serde types and converted to the wire types.
//!
//! Field names are the proto's snake_case ones, as crictl's documentation writes them; the
//! camelCase spelling of protobuf JSON is accepted too. Only the fields a test needs are covered,
//! and any other field is an error that names it, so a typo never silently drops a setting.
//! Enum fields (namespace modes, mount propagation) take the proto's name (`"NODE"`) or number.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

use super::pb;

/// A pod or container file that could not be read or parsed.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a pod file's text (crictl's `pod.json`).
pub fn pod_config_from_json(text: &str) -> Result<pb::PodSandboxConfig, serde_json::Error> {
    serde_json::from_str::<PodConfig>(text).map(Into::into)
}

/// Parses a container file's text (crictl's `container.json`).
pub fn container_config_from_json(text: &str) -> Result<pb::ContainerConfig, serde_json::Error> {
    serde_json::from_str::<ContainerConfig>(text).map(Into::into)
}

/// Reads and parses a pod file.
pub fn load_pod_config(path: &Path) -> Result<pb::PodSandboxConfig, ConfigError> {
    load(path, pod_config_from_json)
}

/// Reads and parses a container file.
pub fn load_container_config(path: &Path) -> Result<pb::ContainerConfig, ConfigError> {
    load(path, container_config_from_json)
}

fn load<T>(path: &Path, parse: fn(&str) -> Result<T, serde_json::Error>) -> Result<T, ConfigError> {
    let error = |reason: String| ConfigError {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    parse(&text).map_err(|e| error(e.to_string()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodConfig {
    metadata: PodMetadata,
    hostname: String,
    #[serde(alias = "logDirectory")]
    log_directory: String,
    #[serde(alias = "dnsConfig")]
    dns_config: Option<DnsConfig>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    linux: Option<LinuxPodConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodMetadata {
    name: String,
    uid: String,
    namespace: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DnsConfig {
    servers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LinuxPodConfig {
    #[serde(alias = "cgroupParent")]
    cgroup_parent: String,
    #[serde(alias = "securityContext")]
    security_context: Option<PodSecurityContext>,
    sysctls: HashMap<String, String>,
    overhead: Option<Resources>,
    resources: Option<Resources>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PodSecurityContext {
    #[serde(alias = "namespaceOptions")]
    namespace_options: Option<NamespaceOptions>,
    #[serde(alias = "runAsUser")]
    run_as_user: Option<Int64Value>,
    #[serde(alias = "runAsGroup")]
    run_as_group: Option<Int64Value>,
    #[serde(alias = "readonlyRootfs")]
    readonly_rootfs: bool,
    #[serde(alias = "supplementalGroups")]
    supplemental_groups: Vec<i64>,
    privileged: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct NamespaceOptions {
    #[serde(deserialize_with = "namespace_mode")]
    network: i32,
    #[serde(deserialize_with = "namespace_mode")]
    pid: i32,
    #[serde(deserialize_with = "namespace_mode")]
    ipc: i32,
    #[serde(alias = "targetId")]
    target_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Int64Value {
    value: i64,
}

/// `LinuxContainerResources`, for pods, containers and `update`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Resources {
    #[serde(alias = "cpuPeriod")]
    cpu_period: i64,
    #[serde(alias = "cpuQuota")]
    cpu_quota: i64,
    #[serde(alias = "cpuShares")]
    cpu_shares: i64,
    #[serde(alias = "memoryLimitInBytes")]
    memory_limit_in_bytes: i64,
    #[serde(alias = "oomScoreAdj")]
    oom_score_adj: i64,
    #[serde(alias = "cpusetCpus")]
    cpuset_cpus: String,
    #[serde(alias = "cpusetMems")]
    cpuset_mems: String,
    unified: HashMap<String, String>,
    #[serde(alias = "memorySwapLimitInBytes")]
    memory_swap_limit_in_bytes: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerConfig {
    metadata: ContainerMetadata,
    image: ImageSpec,
    command: Vec<String>,
    args: Vec<String>,
    #[serde(alias = "workingDir")]
    working_dir: String,
    envs: Vec<KeyValue>,
    mounts: Vec<Mount>,
    labels: HashMap<String, String>,
    annotations: HashMap<String, String>,
    #[serde(alias = "logPath")]
    log_path: String,
    stdin: bool,
    #[serde(alias = "stdinOnce")]
    stdin_once: bool,
    tty: bool,
    linux: Option<LinuxContainerConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerMetadata {
    name: String,
    attempt: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ImageSpec {
    image: String,
    annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KeyValue {
    key: String,
    value: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Mount {
    #[serde(alias = "containerPath")]
    container_path: String,
    #[serde(alias = "hostPath")]
    host_path: String,
    readonly: bool,
    #[serde(alias = "selinuxRelabel")]
    selinux_relabel: bool,
    #[serde(deserialize_with = "mount_propagation")]
    propagation: i32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LinuxContainerConfig {
    resources: Option<Resources>,
    #[serde(alias = "securityContext")]
    security_context: Option<ContainerSecurityContext>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ContainerSecurityContext {
    capabilities: Option<Capabilities>,
    privileged: bool,
    #[serde(alias = "namespaceOptions")]
    namespace_options: Option<NamespaceOptions>,
    #[serde(alias = "runAsUser")]
    run_as_user: Option<Int64Value>,
    #[serde(alias = "runAsGroup")]
    run_as_group: Option<Int64Value>,
    #[serde(alias = "runAsUsername")]
    run_as_username: String,
    #[serde(alias = "readonlyRootfs")]
    readonly_rootfs: bool,
    #[serde(alias = "supplementalGroups")]
    supplemental_groups: Vec<i64>,
    #[serde(alias = "noNewPrivs")]
    no_new_privs: bool,
    #[serde(alias = "maskedPaths")]
    masked_paths: Vec<String>,
    #[serde(alias = "readonlyPaths")]
    readonly_paths: Vec<String>,
    seccomp: Option<SecurityProfile>,
}

/// `SecurityProfile` (seccomp): `profile_type` by name, as crictl's JSON writes it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SecurityProfile {
    #[serde(alias = "profileType")]
    profile_type: ProfileType,
    #[serde(alias = "localhostRef")]
    localhost_ref: String,
}

#[derive(Debug, Default, Deserialize)]
enum ProfileType {
    #[default]
    RuntimeDefault,
    Unconfined,
    Localhost,
}

impl From<SecurityProfile> for pb::SecurityProfile {
    fn from(p: SecurityProfile) -> Self {
        let profile_type = match p.profile_type {
            ProfileType::RuntimeDefault => pb::security_profile::ProfileType::RuntimeDefault,
            ProfileType::Unconfined => pb::security_profile::ProfileType::Unconfined,
            ProfileType::Localhost => pb::security_profile::ProfileType::Localhost,
        };
        pb::SecurityProfile {
            profile_type: profile_type.into(),
            localhost_ref: p.localhost_ref,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Capabilities {
    #[serde(alias = "addCapabilities")]
    add_capabilities: Vec<String>,
    #[serde(alias = "dropCapabilities")]
    drop_capabilities: Vec<String>,
    #[serde(alias = "addAmbientCapabilities")]
    add_ambient_capabilities: Vec<String>,
}

/// A proto enum field given by name or number; the value is checked against the enum.
struct ProtoEnum {
    name: &'static str,
    from_name: fn(&str) -> Option<i32>,
    is_valid: fn(i32) -> bool,
}

impl<'de> Visitor<'de> for ProtoEnum {
    type Value = i32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} name or number", self.name)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
        (self.from_name)(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
        i32::try_from(v)
            .ok()
            .filter(|n| (self.is_valid)(*n))
            .ok_or_else(|| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
        i32::try_from(v)
            .ok()
            .filter(|n| (self.is_valid)(*n))
            .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(v), &self))
    }
}

fn namespace_mode<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    d.deserialize_any(ProtoEnum {
        name: "NamespaceMode (POD, CONTAINER, NODE, TARGET)",
        from_name: |s| pb::NamespaceMode::from_str_name(s).map(|m| m as i32),
        is_valid: |n| pb::NamespaceMode::try_from(n).is_ok(),
    })
}

fn mount_propagation<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    d.deserialize_any(ProtoEnum {
        name: "MountPropagation (PROPAGATION_PRIVATE, PROPAGATION_HOST_TO_CONTAINER, \
               PROPAGATION_BIDIRECTIONAL)",
        from_name: |s| pb::MountPropagation::from_str_name(s).map(|m| m as i32),
        is_valid: |n| pb::MountPropagation::try_from(n).is_ok(),
    })
}

impl From<PodConfig> for pb::PodSandboxConfig {
    fn from(c: PodConfig) -> Self {
        pb::PodSandboxConfig {
            metadata: Some(pb::PodSandboxMetadata {
                name: c.metadata.name,
                uid: c.metadata.uid,
                namespace: c.metadata.namespace,
                attempt: c.metadata.attempt,
            }),
            hostname: c.hostname,
            log_directory: c.log_directory,
            dns_config: c.dns_config.map(|d| pb::DnsConfig {
                servers: d.servers,
                searches: d.searches,
                options: d.options,
            }),
            labels: c.labels,
            annotations: c.annotations,
            linux: c.linux.map(|l| pb::LinuxPodSandboxConfig {
                cgroup_parent: l.cgroup_parent,
                security_context: l.security_context.map(Into::into),
                sysctls: l.sysctls,
                overhead: l.overhead.map(Into::into),
                resources: l.resources.map(Into::into),
            }),
            ..Default::default()
        }
    }
}

impl From<PodSecurityContext> for pb::LinuxSandboxSecurityContext {
    fn from(s: PodSecurityContext) -> Self {
        pb::LinuxSandboxSecurityContext {
            namespace_options: s.namespace_options.map(Into::into),
            run_as_user: s.run_as_user.map(Into::into),
            run_as_group: s.run_as_group.map(Into::into),
            readonly_rootfs: s.readonly_rootfs,
            supplemental_groups: s.supplemental_groups,
            privileged: s.privileged,
            ..Default::default()
        }
    }
}

impl From<NamespaceOptions> for pb::NamespaceOption {
    fn from(n: NamespaceOptions) -> Self {
        pb::NamespaceOption {
            network: n.network,
            pid: n.pid,
            ipc: n.ipc,
            target_id: n.target_id,
            userns_options: None,
        }
    }
}

impl From<Int64Value> for pb::Int64Value {
    fn from(v: Int64Value) -> Self {
        pb::Int64Value { value: v.value }
    }
}

impl From<Resources> for pb::LinuxContainerResources {
    fn from(r: Resources) -> Self {
        pb::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit_in_bytes,
            oom_score_adj: r.oom_score_adj,
            cpuset_cpus: r.cpuset_cpus,
            cpuset_mems: r.cpuset_mems,
            hugepage_limits: Vec::new(),
            unified: r.unified,
            memory_swap_limit_in_bytes: r.memory_swap_limit_in_bytes,
        }
    }
}

impl From<ContainerConfig> for pb::ContainerConfig {
    fn from(c: ContainerConfig) -> Self {
        pb::ContainerConfig {
            metadata: Some(pb::ContainerMetadata {
                name: c.metadata.name,
                attempt: c.metadata.attempt,
            }),
            image: Some(pb::ImageSpec {
                image: c.image.image,
                annotations: c.image.annotations,
                ..Default::default()
            }),
            command: c.command,
            args: c.args,
            working_dir: c.working_dir,
            envs: c
                .envs
                .into_iter()
                .map(|e| pb::KeyValue {
                    key: e.key,
                    value: e.value,
                })
                .collect(),
            mounts: c.mounts.into_iter().map(Into::into).collect(),
            labels: c.labels,
            annotations: c.annotations,
            log_path: c.log_path,
            stdin: c.stdin,
            stdin_once: c.stdin_once,
            tty: c.tty,
            linux: c.linux.map(|l| pb::LinuxContainerConfig {
                resources: l.resources.map(Into::into),
                security_context: l.security_context.map(Into::into),
            }),
            ..Default::default()
        }
    }
}

impl From<Mount> for pb::Mount {
    fn from(m: Mount) -> Self {
        pb::Mount {
            container_path: m.container_path,
            host_path: m.host_path,
            readonly: m.readonly,
            selinux_relabel: m.selinux_relabel,
            propagation: m.propagation,
            ..Default::default()
        }
    }
}

impl From<ContainerSecurityContext> for pb::LinuxContainerSecurityContext {
    fn from(s: ContainerSecurityContext) -> Self {
        pb::LinuxContainerSecurityContext {
            capabilities: s.capabilities.map(|c| pb::Capability {
                add_capabilities: c.add_capabilities,
                drop_capabilities: c.drop_capabilities,
                add_ambient_capabilities: c.add_ambient_capabilities,
            }),
            privileged: s.privileged,
            namespace_options: s.namespace_options.map(Into::into),
            run_as_user: s.run_as_user.map(Into::into),
            run_as_group: s.run_as_group.map(Into::into),
            run_as_username: s.run_as_username,
            readonly_rootfs: s.readonly_rootfs,
            supplemental_groups: s.supplemental_groups,
            no_new_privs: s.no_new_privs,
            masked_paths: s.masked_paths,
            readonly_paths: s.readonly_paths,
            seccomp: s.seccomp.map(Into::into),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_POD: &str = include_str!("../../cri/pod.json");
    const EXAMPLE_CONTAINER: &str = include_str!("../../cri/container.json");

    #[test]
    fn test_example_pod_json_maps_to_pod_sandbox_config() {
        let pod = pod_config_from_json(EXAMPLE_POD).unwrap();

        let metadata = pod.metadata.unwrap();
        assert_eq!(metadata.name, "accordion-test");
        assert_eq!(metadata.namespace, "default");
        assert_eq!(metadata.uid, "accordion-test-uid");
        assert_eq!(metadata.attempt, 1);
        assert_eq!(pod.log_directory, "/tmp/accordion-test");
        let resources = pod.linux.unwrap().resources.unwrap();
        assert_eq!(resources.cpu_quota, 100_000);
        assert_eq!(resources.cpu_period, 100_000);
    }

    #[test]
    fn test_example_container_json_maps_to_container_config() {
        let c = container_config_from_json(EXAMPLE_CONTAINER).unwrap();

        assert_eq!(c.metadata.unwrap().name, "main");
        assert_eq!(c.image.unwrap().image, "localhost/accordion-test:latest");
        assert_eq!(c.command, ["sh", "-c", "echo started; exec sleep 3600"]);
        assert_eq!(c.log_path, "main.log");
        assert_eq!(c.envs[0].key, "ACCORDION_TEST");
        assert_eq!(c.envs[0].value, "1");
        let resources = c.linux.unwrap().resources.unwrap();
        assert_eq!(resources.cpu_quota, 100_000);
        assert_eq!(resources.cpu_period, 100_000);
        assert_eq!(resources.cpu_shares, 1024);
        assert_eq!(resources.memory_limit_in_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn test_camel_case_fields_and_enum_names_are_accepted() {
        let text = r#"{"metadata":{"name":"p"},"logDirectory":"/tmp/p",
            "linux":{"securityContext":{"namespaceOptions":{"network":"NODE","pid":1},
            "runAsUser":{"value":0}}}}"#;

        let pod = pod_config_from_json(text).unwrap();

        assert_eq!(pod.log_directory, "/tmp/p");
        let sc = pod.linux.unwrap().security_context.unwrap();
        let ns = sc.namespace_options.unwrap();
        assert_eq!(ns.network, pb::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, pb::NamespaceMode::Container as i32);
        assert_eq!(sc.run_as_user.unwrap().value, 0);
    }

    #[test]
    fn test_container_mounts_map_with_propagation() {
        let text = r#"{"metadata":{"name":"c"},"image":{"image":"i"},
            "mounts":[{"container_path":"/data","host_path":"/tmp/d","readonly":true,
            "propagation":"PROPAGATION_HOST_TO_CONTAINER"}]}"#;

        let c = container_config_from_json(text).unwrap();

        assert_eq!(c.mounts.len(), 1);
        assert_eq!(c.mounts[0].container_path, "/data");
        assert_eq!(c.mounts[0].host_path, "/tmp/d");
        assert!(c.mounts[0].readonly);
        assert_eq!(
            c.mounts[0].propagation,
            pb::MountPropagation::PropagationHostToContainer as i32
        );
    }

    #[test]
    fn test_unknown_nested_field_is_an_error_naming_it() {
        let text = r#"{"metadata":{"name":"c"},"linux":{"resources":{"cpu_quotaa":1}}}"#;

        let err = container_config_from_json(text).unwrap_err().to_string();

        assert!(err.contains("unknown field `cpu_quotaa`"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn test_wrong_type_is_an_error_with_its_position() {
        let text = "{\n  \"metadata\": {\"name\": \"p\", \"attempt\": \"one\"}\n}";

        let err = pod_config_from_json(text).unwrap_err().to_string();

        assert!(err.contains("invalid type: string \"one\""), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn test_unknown_namespace_mode_is_an_error_listing_the_names() {
        let text = r#"{"linux":{"security_context":{"namespace_options":{"network":"HOST"}}}}"#;

        let err = pod_config_from_json(text).unwrap_err().to_string();

        assert!(err.contains("\"HOST\""), "{err}");
        assert!(err.contains("POD, CONTAINER, NODE, TARGET"), "{err}");
    }

    #[test]
    fn test_load_reports_the_path_of_a_missing_file() {
        let err = load_pod_config(Path::new("/nonexistent/pod.json")).unwrap_err();

        assert!(
            err.to_string().starts_with("/nonexistent/pod.json: "),
            "{err}"
        );
    }
}
