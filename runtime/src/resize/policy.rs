//! From pod CPU resources to a vCPU target (DESIGN.md, "Resize").
//!
//! kubelet expresses a container's CPU request as cgroup shares and its limit as a CFS quota over a
//! period; containerd hands both to the shim as OCI `LinuxResources` (at Create and at every task
//! Update). The pod's vCPU target is
//! `max(ceil(Σ per container: limit if set, else request), min_vcpus)`, with pod-level resources
//! (the sandbox's annotations) winning when they set a limit; a target above `max_vcpus` is refused.
//! The conversions mirror kubelet's (pkg/kubelet/cm/helpers_linux.go): 1 CPU = 1024 shares, the
//! smallest share value (2) means "no request", quota/period is the limit.

use std::collections::BTreeMap;

use oci_spec::runtime::LinuxResources;

use crate::config::SizingPolicy;

/// Shares kubelet gives a container without a CPU request (BestEffort).
const MIN_SHARES: u64 = 2;
/// Shares per CPU.
const SHARES_PER_CPU: u64 = 1024;
/// Millicores per CPU.
const MILLIS_PER_CPU: u64 = 1000;

/// Errors of sizing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("Malformed LinuxResources: {0}")]
    Malformed(String),
    #[error("CPU period {0} µs is invalid (must be 1000 to 1000000)")]
    Period(u64),
    #[error("The pod needs {needed} vCPUs but the sandbox can have at most {max}")]
    AboveMax { needed: u32, max: u32 },
}

/// One container's (or the pod's) CPU resources, in millicores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuShape {
    /// From the CFS quota over its period; `None`: no limit.
    pub limit_millis: Option<u64>,
    /// From the shares; `None`: no request (BestEffort).
    pub request_millis: Option<u64>,
}

impl CpuShape {
    /// Reads the CPU part of OCI `LinuxResources` JSON (what task Update carries).
    pub fn from_resources_json(json: &[u8]) -> Result<Self, PolicyError> {
        let resources: LinuxResources =
            serde_json::from_slice(json).map_err(|e| PolicyError::Malformed(e.to_string()))?;
        Self::from_resources(&resources)
    }

    /// Reads the CPU part of OCI `LinuxResources`.
    pub fn from_resources(resources: &LinuxResources) -> Result<Self, PolicyError> {
        let Some(cpu) = resources.cpu() else {
            return Ok(Self::default());
        };
        Self::from_cfs(cpu.quota(), cpu.period(), cpu.shares())
    }

    /// From a CFS quota/period (µs; quota ≤ 0 or absent = unlimited) and cgroup v1 shares.
    pub fn from_cfs(
        quota: Option<i64>,
        period: Option<u64>,
        shares: Option<u64>,
    ) -> Result<Self, PolicyError> {
        let limit_millis = match (quota, period) {
            (Some(quota), period) if quota > 0 => {
                // runc's default period when only a quota is given.
                let period = period.unwrap_or(100_000);
                if !(1_000..=1_000_000).contains(&period) {
                    return Err(PolicyError::Period(period));
                }
                Some((quota as u64 * MILLIS_PER_CPU).div_ceil(period))
            }
            _ => None,
        };
        let request_millis = match shares {
            Some(s) if s > MIN_SHARES => Some(s * MILLIS_PER_CPU / SHARES_PER_CPU),
            _ => None,
        };
        Ok(Self {
            limit_millis,
            request_millis,
        })
    }

    /// What this counts for under `policy`, in millicores.
    fn counted(&self, policy: SizingPolicy) -> u64 {
        match policy {
            SizingPolicy::LimitsThenRequests => self.limit_millis.or(self.request_millis),
            SizingPolicy::Limits => self.limit_millis,
            SizingPolicy::Requests => self.request_millis,
        }
        .unwrap_or(0)
    }
}

/// kubelet's MilliCPUToShares: the shares a request of `millis` becomes.
pub fn millis_to_shares(millis: u64) -> u64 {
    (millis * SHARES_PER_CPU / MILLIS_PER_CPU).clamp(MIN_SHARES, 262_144)
}

/// Every container's CPU shape, and the pod's own when the sandbox set one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodCpu {
    /// By container id.
    pub containers: BTreeMap<String, CpuShape>,
    /// Pod-level resources (sandbox annotations), when given.
    pub pod: Option<CpuShape>,
}

impl PodCpu {
    /// The vCPU target of the pod under `policy`, at least `min`; an error above `max`.
    pub fn target(&self, policy: SizingPolicy, min: u32, max: u32) -> Result<u32, PolicyError> {
        let pod_limit = self
            .pod
            .and_then(|p| p.limit_millis)
            .filter(|_| policy != SizingPolicy::Requests);
        let millis = match pod_limit {
            Some(limit) => limit,
            None => self.containers.values().map(|c| c.counted(policy)).sum(),
        };
        let needed = u32::try_from(millis.div_ceil(MILLIS_PER_CPU)).unwrap_or(u32::MAX);
        if needed > max {
            return Err(PolicyError::AboveMax { needed, max });
        }
        Ok(needed.max(min))
    }

    /// The pod's CPU limit in millicores (what its host cgroup's cpu.max follows): its own when
    /// set, else the sum of its containers' when every one has a limit; None when a container
    /// is unlimited or there is none yet.
    pub fn limit_millis(&self) -> Option<u64> {
        if let Some(limit) = self.pod.and_then(|p| p.limit_millis) {
            return Some(limit);
        }
        if self.containers.is_empty() {
            return None;
        }
        self.containers
            .values()
            .try_fold(0u64, |sum, c| c.limit_millis.map(|l| sum.saturating_add(l)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SizingPolicy::{Limits, LimitsThenRequests, Requests};

    /// A container as kubelet configures it: request and limit in millicores.
    fn container(request: Option<u64>, limit: Option<u64>) -> CpuShape {
        let shares = Some(request.map_or(MIN_SHARES, millis_to_shares));
        let quota = limit.map(|l| (l * 100_000 / 1000) as i64);
        CpuShape::from_cfs(quota, Some(100_000), shares).expect("valid")
    }

    fn pod(containers: &[CpuShape]) -> PodCpu {
        PodCpu {
            containers: containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("c{i}"), *c))
                .collect(),
            pod: None,
        }
    }

    #[test]
    fn test_guaranteed_pod_gets_its_limit() {
        let p = pod(&[container(Some(2000), Some(2000))]);
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(2));
        assert_eq!(p.target(Requests, 1, 8), Ok(2));
    }

    #[test]
    fn test_burstable_counts_limit_then_request_by_policy() {
        let p = pod(&[container(Some(500), Some(1500))]);
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(2));
        assert_eq!(p.target(Limits, 1, 8), Ok(2));
        assert_eq!(p.target(Requests, 1, 8), Ok(1));
        // A request without a limit counts under limits-then-requests, not under limits.
        let p = pod(&[container(Some(2500), None)]);
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(3));
        assert_eq!(p.target(Limits, 1, 8), Ok(1));
    }

    #[test]
    fn test_best_effort_gets_the_minimum() {
        let p = pod(&[container(None, None)]);
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(1));
        assert_eq!(p.target(LimitsThenRequests, 2, 8), Ok(2));
    }

    #[test]
    fn test_multi_container_sums_before_rounding_up() {
        let p = pod(&[
            container(Some(1500), Some(1500)),
            container(Some(700), None),
            container(None, None),
        ]);
        // 1.5 + 0.7 = 2.2 → 3.
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(3));
    }

    #[test]
    fn test_pod_level_limit_wins() {
        let mut p = pod(&[
            container(Some(500), Some(500)),
            container(Some(500), Some(500)),
        ]);
        p.pod = Some(container(None, Some(4000)));
        assert_eq!(p.target(LimitsThenRequests, 1, 8), Ok(4));
        assert_eq!(p.target(Requests, 1, 8), Ok(1));
    }

    #[test]
    fn test_above_max_is_refused() {
        let p = pod(&[container(Some(9000), Some(9000))]);
        assert_eq!(
            p.target(LimitsThenRequests, 1, 8),
            Err(PolicyError::AboveMax { needed: 9, max: 8 })
        );
    }

    #[test]
    fn test_resources_json_as_containerd_sends_it() {
        let shape = CpuShape::from_resources_json(
            br#"{"cpu":{"shares":1024,"quota":150000,"period":100000},"memory":{"limit":268435456}}"#,
        )
        .expect("json");
        assert_eq!(shape.limit_millis, Some(1500));
        assert_eq!(shape.request_millis, Some(1000));
        assert_eq!(
            CpuShape::from_resources_json(b"{}"),
            Ok(CpuShape::default())
        );
        assert!(matches!(
            CpuShape::from_resources_json(b"{\"cpu\": 5}"),
            Err(PolicyError::Malformed(_))
        ));
        assert!(matches!(
            CpuShape::from_resources_json(br#"{"cpu":{"quota":1000,"period":10}}"#),
            Err(PolicyError::Period(10))
        ));
        // -1 is "no limit" for runc and containerd.
        let unlimited =
            CpuShape::from_resources_json(br#"{"cpu":{"quota":-1,"period":100000}}"#).expect("ok");
        assert_eq!(unlimited.limit_millis, None);
    }

    #[test]
    fn test_shares_conversion_round_trips_like_kubelet() {
        assert_eq!(millis_to_shares(0), 2);
        assert_eq!(millis_to_shares(1000), 1024);
        assert_eq!(millis_to_shares(250), 256);
        let shape = CpuShape::from_cfs(None, None, Some(millis_to_shares(250))).expect("ok");
        assert_eq!(shape.request_millis, Some(250));
    }

    #[test]
    fn test_edges_zero_quota_cpuset_only_shares_only_and_nothing() {
        // No resources at all: the minimum, under every policy.
        let empty = CpuShape::from_resources_json(b"{}").expect("ok");
        for policy in [LimitsThenRequests, Limits, Requests] {
            assert_eq!(pod(&[empty]).target(policy, 1, 8), Ok(1));
        }
        // A zero quota is no limit (runc ignores it), not zero CPUs.
        let zero =
            CpuShape::from_resources_json(br#"{"cpu":{"quota":0,"period":100000}}"#).expect("ok");
        assert_eq!(zero.limit_millis, None);
        // A cpuset alone sizes nothing: it pins, the guest cgroup applies it.
        let cpuset = CpuShape::from_resources_json(br#"{"cpu":{"cpus":"0-3"}}"#).expect("ok");
        assert_eq!(cpuset, CpuShape::default());
        assert_eq!(pod(&[cpuset]).target(LimitsThenRequests, 1, 8), Ok(1));
        // Shares only: a request (3 CPUs), counted unless the policy is limits.
        let shares = CpuShape::from_resources_json(br#"{"cpu":{"shares":3072}}"#).expect("ok");
        assert_eq!(pod(&[shares]).target(LimitsThenRequests, 1, 8), Ok(3));
        assert_eq!(pod(&[shares]).target(Requests, 1, 8), Ok(3));
        assert_eq!(pod(&[shares]).target(Limits, 1, 8), Ok(1));
        // The minimum still applies above 1.
        assert_eq!(pod(&[empty]).target(Limits, 2, 8), Ok(2));
    }

    #[test]
    fn test_limit_millis_is_the_pod_limit_or_the_sum_when_every_container_has_one() {
        let limited = pod(&[container(None, Some(500)), container(Some(100), Some(250))]);
        let one_unlimited = pod(&[container(None, Some(500)), container(Some(100), None)]);
        let with_pod_limit = PodCpu {
            pod: Some(container(None, Some(2000))),
            ..one_unlimited.clone()
        };
        assert_eq!(limited.limit_millis(), Some(750));
        assert_eq!(one_unlimited.limit_millis(), None);
        assert_eq!(with_pod_limit.limit_millis(), Some(2000));
        assert_eq!(PodCpu::default().limit_millis(), None);
    }
}
