//! From pod CPU resources to a vCPU target (docs/resize.md, "Kubernetes: in-place pod resize").
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
/// The most shares the kernel takes (cgroup v1 `cpu.shares`; kubelet clamps to it too).
const MAX_SHARES: u64 = 262_144;
/// Shares per CPU.
const SHARES_PER_CPU: u64 = 1024;
/// Millicores per CPU.
const MILLIS_PER_CPU: u64 = 1000;
/// The kernel's bounds on a CFS period, µs (`cpu.cfs_period_us`, `cpu.max`).
const MIN_PERIOD_US: u64 = 1_000;
const MAX_PERIOD_US: u64 = 1_000_000;
/// The kernel's largest CFS quota, µs (`max_cfs_runtime`: 2^44 - 1, about 203 days); it refuses
/// more with EINVAL.
const MAX_QUOTA_US: i64 = (1 << 44) - 1;
/// runc's period when only a quota is given, µs.
const DEFAULT_PERIOD_US: u64 = 100_000;
/// Bytes per MiB.
const MIB: u64 = 1 << 20;

/// Errors of sizing. Each is the caller's bad input: the shim answers `InvalidArgument`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("Malformed LinuxResources: {0}")]
    Malformed(String),
    #[error("CPU period {0} µs is invalid (must be {MIN_PERIOD_US} to {MAX_PERIOD_US})")]
    Period(u64),
    #[error(
        "CPU quota {0} µs is invalid (must be at most {MAX_QUOTA_US}, or negative for no limit)"
    )]
    Quota(i64),
    #[error("CPU shares {0} is invalid (must be at most {MAX_SHARES})")]
    Shares(u64),
    #[error("The pod's CPU resources add up to more than can be counted")]
    Overflow,
    #[error("The pod needs {needed} vCPUs but the sandbox can have at most {max}")]
    AboveMax { needed: u64, max: u32 },
    #[error("Memory limit {0} bytes is invalid (must be -1 for no limit, or positive)")]
    MemoryLimit(i64),
    #[error(
        "Memory limit {limit} bytes exceeds the VM's memory ({vm_mib} MiB), which is fixed: the \
         pod was started without room to grow (memory.max_mib in config.toml, or the pod \
         annotation accordion.dev/max-memory)"
    )]
    MemoryAboveVm { limit: u64, vm_mib: u64 },
    #[error(
        "The pod's memory limits need {needed_mib} MiB of guest memory (with the guest's own \
         {overhead_mib} MiB) but the sandbox can grow to at most {max_mib} MiB"
    )]
    MemoryAboveMax {
        needed_mib: u64,
        overhead_mib: u64,
        max_mib: u64,
    },
    #[error(
        "Memory limit {bytes} bytes needs a VM larger than the most a VM can have ({max_mib} MiB)"
    )]
    MemoryTooLarge { bytes: u64, max_mib: u64 },
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
        // A negative quota is no limit: the kernel's rule (and runc's -1).
        let limit_millis = match quota {
            Some(quota) if quota > MAX_QUOTA_US => return Err(PolicyError::Quota(quota)),
            Some(quota) if quota > 0 => {
                let period = period.unwrap_or(DEFAULT_PERIOD_US);
                if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&period) {
                    return Err(PolicyError::Period(period));
                }
                // Bounded above: at most 2^44 × 1000, far below u64::MAX.
                let quota = u64::try_from(quota).map_err(|_| PolicyError::Quota(quota))?;
                let millis = quota
                    .checked_mul(MILLIS_PER_CPU)
                    .ok_or(PolicyError::Overflow)?
                    .div_ceil(period);
                Some(millis)
            }
            _ => None,
        };
        let request_millis = match shares {
            Some(s) if s > MAX_SHARES => return Err(PolicyError::Shares(s)),
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

/// kubelet's MilliCPUToShares: the shares a request of `millis` becomes. Saturating is exact
/// here: anything past the multiplication's range is past MAX_SHARES too.
pub fn millis_to_shares(millis: u64) -> u64 {
    (millis.saturating_mul(SHARES_PER_CPU) / MILLIS_PER_CPU).clamp(MIN_SHARES, MAX_SHARES)
}

/// Guest memory for a pod whose memory limit is `limit_bytes`: the limit in whole MiB plus the
/// guest's own `overhead_mib`, within what a VM can have.
pub fn guest_memory_mib(limit_bytes: u64, overhead_mib: u64) -> Result<u64, PolicyError> {
    let max_mib = crate::config::MAX_MEMORY_MIB;
    limit_bytes
        .div_ceil(MIB)
        .checked_add(overhead_mib)
        .filter(|&mib| mib <= max_mib)
        .ok_or(PolicyError::MemoryTooLarge {
            bytes: limit_bytes,
            max_mib,
        })
}

/// Guest memory is added in blocks of this many MiB (vmm-core's MEMORY_RESIZE_GRANULE_MIB).
const MEMORY_GRANULE_MIB: u64 = accordion_vmm::config::MEMORY_RESIZE_GRANULE_MIB;

/// The most memory a sandbox booted with `boot_mib` may grow to under a configured maximum of
/// `max_mib`: the maximum rounded down to whole memory blocks above the boot memory (never above
/// what the operator allowed), or None when that leaves no room to grow.
pub fn max_memory_mib(boot_mib: u64, max_mib: u64) -> Option<u64> {
    let room = max_mib.checked_sub(boot_mib)? / MEMORY_GRANULE_MIB * MEMORY_GRANULE_MIB;
    (room > 0).then(|| boot_mib + room)
}

/// A container's memory limit (OCI `memory.limit`, bytes; -1 or 0 for none), validated.
pub fn memory_limit(resources: &LinuxResources) -> Result<Option<u64>, PolicyError> {
    match resources.memory().as_ref().and_then(|m| m.limit()) {
        None | Some(-1 | 0) => Ok(None),
        Some(l) => u64::try_from(l)
            .map(Some)
            .map_err(|_| PolicyError::MemoryLimit(l)),
    }
}

/// Checks a container's memory limit against the memory of its VM, `vm_mib`, when the VM cannot
/// grow: a larger limit could never be honoured.
pub fn check_memory_limit(limit: Option<u64>, vm_mib: u64) -> Result<(), PolicyError> {
    match limit {
        // A VM's memory is at most MAX_MEMORY_MIB, so this never saturates in practice; if it
        // did, u64::MAX is still above every limit, which is the right answer.
        Some(limit) if limit > vm_mib.saturating_mul(MIB) => {
            Err(PolicyError::MemoryAboveVm { limit, vm_mib })
        }
        _ => Ok(()),
    }
}

/// Every container's memory limit, and the pod's own when the sandbox set one: what a pod's guest
/// memory follows when it can grow. CRI carries no memory request, so limits are all there is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMemory {
    /// Limits in bytes by container id (None: no limit).
    pub containers: BTreeMap<String, Option<u64>>,
    /// The pod's limit (sandbox annotations), when given.
    pub pod: Option<u64>,
}

impl PodMemory {
    /// The pod's guest memory, MiB: its limit (its own, else the sum of its containers'; one
    /// without a limit adds nothing) plus the guest's `overhead_mib`, at least `boot_mib`; an error
    /// above `max_mib`.
    pub fn target_mib(
        &self,
        overhead_mib: u64,
        boot_mib: u64,
        max_mib: u64,
    ) -> Result<u64, PolicyError> {
        let bytes = match self.pod {
            Some(bytes) => bytes,
            None => self
                .containers
                .values()
                .flatten()
                .try_fold(0u64, |sum, &l| sum.checked_add(l))
                .ok_or(PolicyError::Overflow)?,
        };
        let needed = guest_memory_mib(bytes, overhead_mib)?;
        if needed > max_mib {
            return Err(PolicyError::MemoryAboveMax {
                needed_mib: needed,
                overhead_mib,
                max_mib,
            });
        }
        Ok(needed.max(boot_mib))
    }
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
            None => self
                .containers
                .values()
                .try_fold(0u64, |sum, c| sum.checked_add(c.counted(policy)))
                .ok_or(PolicyError::Overflow)?,
        };
        let needed = millis.div_ceil(MILLIS_PER_CPU);
        match u32::try_from(needed) {
            Ok(vcpus) if vcpus <= max => Ok(vcpus.max(min)),
            _ => Err(PolicyError::AboveMax { needed, max }),
        }
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

    #[test]
    fn test_huge_quota_is_refused_not_wrapped() {
        assert_eq!(
            CpuShape::from_cfs(Some(i64::MAX), Some(100_000), None),
            Err(PolicyError::Quota(i64::MAX))
        );
        assert_eq!(
            CpuShape::from_cfs(Some(MAX_QUOTA_US + 1), Some(1_000), None),
            Err(PolicyError::Quota(MAX_QUOTA_US + 1))
        );
        // The largest quota the kernel takes, over the shortest period: counted exactly.
        let shape = CpuShape::from_cfs(Some(MAX_QUOTA_US), Some(1_000), None).expect("kernel max");
        assert_eq!(shape.limit_millis, Some(MAX_QUOTA_US as u64));
        assert_eq!(
            pod(&[shape]).target(LimitsThenRequests, 1, 512),
            Err(PolicyError::AboveMax {
                needed: (MAX_QUOTA_US as u64).div_ceil(1000),
                max: 512
            })
        );
    }

    #[test]
    fn test_negative_quota_is_no_limit_as_the_kernel_reads_it() {
        for quota in [-1, -2, i64::MIN] {
            let shape = CpuShape::from_cfs(Some(quota), Some(100_000), Some(1024)).expect("ok");
            assert_eq!(shape.limit_millis, None, "quota {quota}");
            assert_eq!(pod(&[shape]).target(LimitsThenRequests, 1, 8), Ok(1));
        }
    }

    #[test]
    fn test_out_of_range_periods_are_refused() {
        for period in [0, 1, 999, 1_000_001, u64::MAX] {
            assert_eq!(
                CpuShape::from_cfs(Some(100_000), Some(period), None),
                Err(PolicyError::Period(period)),
                "period {period}"
            );
        }
        // Quota 1 µs over the shortest period is 1 millicore: one vCPU.
        let tiny = CpuShape::from_cfs(Some(1), Some(1_000), None).expect("ok");
        assert_eq!(pod(&[tiny]).target(Limits, 1, 8), Ok(1));
    }

    /// runtime/fuzz/regressions/pod_resources/shares_times_1000_overflow: `shares × 1000`
    /// overflowed (found by the pod_resources target).
    #[test]
    fn test_huge_shares_are_refused_and_the_kernel_max_counts() {
        assert_eq!(
            CpuShape::from_cfs(None, None, Some(u64::MAX)),
            Err(PolicyError::Shares(u64::MAX))
        );
        assert_eq!(
            CpuShape::from_cfs(None, None, Some(MAX_SHARES + 1)),
            Err(PolicyError::Shares(MAX_SHARES + 1))
        );
        let max = CpuShape::from_cfs(None, None, Some(MAX_SHARES)).expect("kernel max");
        assert_eq!(pod(&[max]).target(Requests, 1, 512), Ok(256));
        assert!(CpuShape::from_resources_json(br#"{"cpu":{"shares":-1}}"#).is_err());
    }

    #[test]
    fn test_sum_of_many_huge_limits_is_an_error_not_a_wrap() {
        let huge = CpuShape {
            limit_millis: Some(u64::MAX / 2 + 1),
            request_millis: None,
        };
        assert_eq!(
            pod(&[huge, huge]).target(Limits, 1, 512),
            Err(PolicyError::Overflow)
        );
        let just_above = CpuShape {
            limit_millis: Some(u64::from(u32::MAX) * 1000 + 1),
            request_millis: None,
        };
        assert_eq!(
            pod(&[just_above]).target(Limits, 1, 512),
            Err(PolicyError::AboveMax {
                needed: u64::from(u32::MAX) + 1,
                max: 512
            })
        );
    }

    #[test]
    fn test_millis_to_shares_saturates_to_the_kernel_max() {
        assert_eq!(millis_to_shares(u64::MAX), MAX_SHARES);
        assert_eq!(millis_to_shares(256_000), MAX_SHARES);
    }

    #[test]
    fn test_max_memory_rounds_down_to_whole_memory_blocks_above_boot() {
        assert_eq!(max_memory_mib(256, 2048), Some(2048));
        assert_eq!(max_memory_mib(512, 2000), Some(512 + 1408));
        assert_eq!(
            max_memory_mib(640, 700),
            None,
            "less than one block of room"
        );
        assert_eq!(max_memory_mib(512, 512), None);
        assert_eq!(max_memory_mib(512, 0), None);
        assert_eq!(max_memory_mib(0, u64::MAX), Some(u64::MAX / 128 * 128));
    }

    #[test]
    fn test_guest_memory_adds_overhead_within_the_vm_maximum() {
        assert_eq!(guest_memory_mib(1 << 30, 128), Ok(1024 + 128));
        assert_eq!(guest_memory_mib(1, 128), Ok(129));
        let max = crate::config::MAX_MEMORY_MIB;
        assert_eq!(guest_memory_mib((max - 128) * MIB, 128), Ok(max));
        for bytes in [(max - 127) * MIB, u64::MAX] {
            assert_eq!(
                guest_memory_mib(bytes, 128),
                Err(PolicyError::MemoryTooLarge {
                    bytes,
                    max_mib: max
                })
            );
        }
        assert!(guest_memory_mib(u64::MAX, u64::MAX).is_err());
    }

    #[test]
    fn test_memory_limit_check_refuses_negative_and_above_the_vm() {
        let limit = |l: Option<i64>| {
            let mut r = LinuxResources::default();
            if let Some(l) = l {
                r.set_memory(Some(
                    oci_spec::runtime::LinuxMemoryBuilder::default()
                        .limit(l)
                        .build()
                        .unwrap(),
                ));
            }
            memory_limit(&r)
        };
        assert_eq!(limit(None), Ok(None));
        assert_eq!(limit(Some(-1)), Ok(None));
        assert_eq!(limit(Some(0)), Ok(None));
        assert_eq!(limit(Some(512 << 20)), Ok(Some(512 << 20)));
        for l in [-2, i64::MIN] {
            assert_eq!(limit(Some(l)), Err(PolicyError::MemoryLimit(l)));
        }
        assert_eq!(check_memory_limit(None, 512), Ok(()));
        assert_eq!(check_memory_limit(Some(512 << 20), 512), Ok(()));
        assert_eq!(
            check_memory_limit(Some((512 << 20) + 1), 512),
            Err(PolicyError::MemoryAboveVm {
                limit: (512 << 20) + 1,
                vm_mib: 512
            })
        );
        assert!(check_memory_limit(Some(u64::MAX), 512).is_err());
        // A VM size whose byte count would not fit a u64 still compares correctly.
        assert_eq!(check_memory_limit(Some(u64::MAX), u64::MAX), Ok(()));
    }

    #[test]
    fn test_pod_memory_target_is_the_limits_plus_overhead_within_boot_and_max() {
        let mut m = PodMemory::default();
        // Nothing limited: the boot size.
        assert_eq!(m.target_mib(128, 512, 2048), Ok(512));
        m.containers.insert("a".into(), Some(512 << 20));
        m.containers.insert("b".into(), None);
        m.containers.insert("c".into(), Some((256 << 20) + 1));
        // 512 + 257 (rounded up to whole MiB) + 128.
        assert_eq!(m.target_mib(128, 512, 2048), Ok(897));
        assert_eq!(
            m.target_mib(128, 512, 896),
            Err(PolicyError::MemoryAboveMax {
                needed_mib: 897,
                overhead_mib: 128,
                max_mib: 896
            })
        );
        // The pod's own limit wins over the sum.
        m.pod = Some(1 << 30);
        assert_eq!(m.target_mib(128, 512, 2048), Ok(1152));
        m.pod = None;
        m.containers.insert("d".into(), Some(u64::MAX));
        assert_eq!(m.target_mib(128, 512, 2048), Err(PolicyError::Overflow));
        m.containers.insert("d".into(), Some(u64::MAX / 2));
        assert!(matches!(
            m.target_mib(128, 512, 2048),
            Err(PolicyError::MemoryTooLarge { .. })
        ));
    }
}
