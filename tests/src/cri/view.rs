//! What `inspect` and `inspectp` print: the status as JSON with crictl's key names (protobuf
//! JSON's lowerCamelCase) and enum names (`CONTAINER_RUNNING`), so `jq .status.resources.linux`
//! reads the same on both tools. Unlike protobuf JSON, 64-bit integers are JSON numbers, not
//! strings, and fields are always present (zero values included). Each `info` value that is JSON
//! (containerd's verbose `info`) is embedded as JSON, any other as a string.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::pb;

/// `ContainerStatusResponse` → `{"status": …, "info": …}`.
pub fn container_status(response: &pb::ContainerStatusResponse) -> Value {
    json!({
        "status": response.status.as_ref().map(container),
        "info": info(&response.info),
    })
}

/// `PodSandboxStatusResponse` → `{"status": …, "info": …}` (+ `containersStatuses` if any).
pub fn pod_status(response: &pb::PodSandboxStatusResponse) -> Value {
    let mut out = json!({
        "status": response.status.as_ref().map(pod),
        "info": info(&response.info),
    });
    if !response.containers_statuses.is_empty() {
        out["containersStatuses"] = response.containers_statuses.iter().map(container).collect();
    }
    out
}

/// The name of a `ContainerState` value (its number if the runtime sent an unknown one).
pub fn container_state_name(state: i32) -> String {
    pb::ContainerState::try_from(state)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| state.to_string())
}

/// The name of a `PodSandboxState` value (its number if the runtime sent an unknown one).
pub fn pod_state_name(state: i32) -> String {
    pb::PodSandboxState::try_from(state)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| state.to_string())
}

fn namespace_mode_name(mode: i32) -> String {
    pb::NamespaceMode::try_from(mode)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| mode.to_string())
}

fn propagation_name(p: i32) -> String {
    pb::MountPropagation::try_from(p)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| p.to_string())
}

fn info(info: &HashMap<String, String>) -> Value {
    let sorted: Map<String, Value> = info
        .iter()
        .map(|(k, v)| {
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            (k.clone(), value)
        })
        .collect();
    Value::Object(sorted)
}

fn container(s: &pb::ContainerStatus) -> Value {
    let mut out = json!({
        "id": s.id,
        "metadata": s.metadata.as_ref().map(|m| json!({"name": m.name, "attempt": m.attempt})),
        "state": container_state_name(s.state),
        "createdAt": s.created_at,
        "startedAt": s.started_at,
        "finishedAt": s.finished_at,
        "exitCode": s.exit_code,
        "image": s.image.as_ref().map(|i| json!({
            "image": i.image,
            "annotations": i.annotations,
            "userSpecifiedImage": i.user_specified_image,
            "runtimeHandler": i.runtime_handler,
        })),
        "imageRef": s.image_ref,
        "imageId": s.image_id,
        "reason": s.reason,
        "message": s.message,
        "labels": s.labels,
        "annotations": s.annotations,
        "mounts": s.mounts.iter().map(mount).collect::<Vec<_>>(),
        "logPath": s.log_path,
    });
    if let Some(resources) = &s.resources {
        out["resources"] = json!({
            "linux": resources.linux.as_ref().map(linux_resources),
        });
    }
    if let Some(linux) = s.user.as_ref().and_then(|u| u.linux.as_ref()) {
        out["user"] = json!({"linux": {
            "uid": linux.uid,
            "gid": linux.gid,
            "supplementalGroups": linux.supplemental_groups,
        }});
    }
    out
}

fn mount(m: &pb::Mount) -> Value {
    json!({
        "containerPath": m.container_path,
        "hostPath": m.host_path,
        "readonly": m.readonly,
        "selinuxRelabel": m.selinux_relabel,
        "propagation": propagation_name(m.propagation),
        "recursiveReadOnly": m.recursive_read_only,
    })
}

fn linux_resources(r: &pb::LinuxContainerResources) -> Value {
    json!({
        "cpuPeriod": r.cpu_period,
        "cpuQuota": r.cpu_quota,
        "cpuShares": r.cpu_shares,
        "memoryLimitInBytes": r.memory_limit_in_bytes,
        "oomScoreAdj": r.oom_score_adj,
        "cpusetCpus": r.cpuset_cpus,
        "cpusetMems": r.cpuset_mems,
        "hugepageLimits": r.hugepage_limits.iter()
            .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
            .collect::<Vec<_>>(),
        "unified": r.unified,
        "memorySwapLimitInBytes": r.memory_swap_limit_in_bytes,
    })
}

fn pod(s: &pb::PodSandboxStatus) -> Value {
    json!({
        "id": s.id,
        "metadata": s.metadata.as_ref().map(|m| json!({
            "name": m.name,
            "uid": m.uid,
            "namespace": m.namespace,
            "attempt": m.attempt,
        })),
        "state": pod_state_name(s.state),
        "createdAt": s.created_at,
        "network": s.network.as_ref().map(|n| json!({
            "ip": n.ip,
            "additionalIps": n.additional_ips.iter()
                .map(|ip| json!({"ip": ip.ip}))
                .collect::<Vec<_>>(),
        })),
        "linux": s.linux.as_ref().map(|l| json!({
            "namespaces": l.namespaces.as_ref().map(|n| json!({
                "options": n.options.as_ref().map(|o| json!({
                    "network": namespace_mode_name(o.network),
                    "pid": namespace_mode_name(o.pid),
                    "ipc": namespace_mode_name(o.ipc),
                    "targetId": o.target_id,
                })),
            })),
        })),
        "labels": s.labels,
        "annotations": s.annotations,
        "runtimeHandler": s.runtime_handler,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running_container() -> pb::ContainerStatus {
        pb::ContainerStatus {
            id: "c1".into(),
            state: pb::ContainerState::ContainerRunning as i32,
            resources: Some(pb::ContainerResources {
                linux: Some(pb::LinuxContainerResources {
                    cpu_quota: 50_000,
                    cpu_period: 100_000,
                    ..Default::default()
                }),
                windows: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn test_container_status_has_linux_resources_and_state_name() {
        let response = pb::ContainerStatusResponse {
            status: Some(running_container()),
            info: HashMap::new(),
        };

        let v = container_status(&response);

        assert_eq!(v["status"]["state"], "CONTAINER_RUNNING");
        assert_eq!(v["status"]["resources"]["linux"]["cpuQuota"], 50_000);
        assert_eq!(v["status"]["resources"]["linux"]["cpuPeriod"], 100_000);
    }

    #[test]
    fn test_container_status_without_resources_has_no_resources_key() {
        let response = pb::ContainerStatusResponse {
            status: Some(pb::ContainerStatus::default()),
            info: HashMap::new(),
        };

        let v = container_status(&response);

        assert!(v["status"].get("resources").is_none());
        assert_eq!(v["status"]["state"], "CONTAINER_CREATED");
    }

    #[test]
    fn test_info_values_are_embedded_as_json_when_they_are_json() {
        let response = pb::ContainerStatusResponse {
            status: None,
            info: HashMap::from([
                ("info".to_string(), r#"{"pid":42}"#.to_string()),
                ("note".to_string(), "plain text".to_string()),
            ]),
        };

        let v = container_status(&response);

        assert_eq!(v["info"]["info"]["pid"], 42);
        assert_eq!(v["info"]["note"], "plain text");
    }

    #[test]
    fn test_pod_status_names_state_and_namespace_modes() {
        let response = pb::PodSandboxStatusResponse {
            status: Some(pb::PodSandboxStatus {
                id: "p1".into(),
                state: pb::PodSandboxState::SandboxNotready as i32,
                linux: Some(pb::LinuxPodSandboxStatus {
                    namespaces: Some(pb::Namespace {
                        options: Some(pb::NamespaceOption {
                            network: pb::NamespaceMode::Node as i32,
                            ..Default::default()
                        }),
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };

        let v = pod_status(&response);

        assert_eq!(v["status"]["state"], "SANDBOX_NOTREADY");
        assert_eq!(
            v["status"]["linux"]["namespaces"]["options"]["network"],
            "NODE"
        );
        assert!(v.get("containersStatuses").is_none());
    }
}
