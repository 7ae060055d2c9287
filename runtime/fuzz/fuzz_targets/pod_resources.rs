//! The sizing arithmetic on any numbers containerd could hand the shim: CFS quota/period and
//! shares (task create and Update, sandbox annotations), several containers' sum, the vCPU target,
//! and the memory limit checks. Checked against the same arithmetic done in i128/u128, where
//! nothing can overflow.
//!
//! Invariants: nothing panics; every accepted value is exactly what the wide arithmetic gives;
//! every refusal is a real overflow or out-of-range value, never a wrapped or saturated count.

#![no_main]

use accordion_runtime::config::{SizingPolicy, MAX_MEMORY_MIB};
use accordion_runtime::resize::policy::{
    check_memory_limit, guest_memory_mib, memory_limit, CpuShape, PodCpu, PodMemory, PolicyError,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Cfs {
    quota: Option<i64>,
    period: Option<u64>,
    shares: Option<u64>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    containers: Vec<Cfs>,
    pod: Option<Cfs>,
    policy: u8,
    min: u32,
    max: u32,
    memory_bytes: u64,
    overhead_mib: u64,
    memory_limit: Option<i64>,
    vm_mib: u64,
    /// Containers' memory limits, the pod's boot and max memory (MiB).
    memory_limits: Vec<Option<u64>>,
    boot_mib: u64,
    max_mib: u64,
}

const MILLIS_PER_CPU: u128 = 1000;

/// A shape, or `None` when `from_cfs` refused the values; checks what it accepted.
fn shape(cfs: &Cfs) -> Option<CpuShape> {
    match CpuShape::from_cfs(cfs.quota, cfs.period, cfs.shares) {
        Ok(shape) => {
            match (cfs.quota, shape.limit_millis) {
                (Some(q), Some(millis)) => {
                    let period = u128::from(cfs.period.unwrap_or(100_000));
                    let wide = (q as u128 * MILLIS_PER_CPU).div_ceil(period);
                    assert!(q > 0);
                    assert_eq!(u128::from(millis), wide, "{cfs:?}");
                }
                (q, None) => assert!(q.is_none_or(|q| q <= 0), "{cfs:?}"),
                (None, Some(_)) => panic!("a limit without a quota: {cfs:?}"),
            }
            if let Some(millis) = shape.request_millis {
                let shares = u128::from(cfs.shares.expect("a request has shares"));
                assert_eq!(u128::from(millis), shares * MILLIS_PER_CPU / 1024);
            }
            Some(shape)
        }
        Err(PolicyError::Quota(_) | PolicyError::Period(_) | PolicyError::Shares(_)) => None,
        Err(e) => panic!("from_cfs gave {e:?} for {cfs:?}"),
    }
}

fuzz_target!(|input: Input| {
    let policy = match input.policy % 3 {
        0 => SizingPolicy::LimitsThenRequests,
        1 => SizingPolicy::Limits,
        _ => SizingPolicy::Requests,
    };
    let mut pod = PodCpu::default();
    for (i, cfs) in input.containers.iter().enumerate() {
        if let Some(s) = shape(cfs) {
            pod.containers.insert(format!("c{i}"), s);
        }
    }
    pod.pod = input.pod.as_ref().and_then(shape);

    let counted = |s: &CpuShape| -> u128 {
        let millis = match policy {
            SizingPolicy::LimitsThenRequests => s.limit_millis.or(s.request_millis),
            SizingPolicy::Limits => s.limit_millis,
            SizingPolicy::Requests => s.request_millis,
        };
        u128::from(millis.unwrap_or(0))
    };
    let pod_limit = pod
        .pod
        .and_then(|p| p.limit_millis)
        .filter(|_| policy != SizingPolicy::Requests);
    let wide_millis: u128 = match pod_limit {
        Some(limit) => u128::from(limit),
        None => pod.containers.values().map(counted).sum(),
    };
    let wide_needed = wide_millis.div_ceil(MILLIS_PER_CPU);
    match pod.target(policy, input.min, input.max) {
        Ok(vcpus) => {
            assert!(wide_needed <= u128::from(input.max));
            assert_eq!(u128::from(vcpus), wide_needed.max(u128::from(input.min)));
        }
        Err(PolicyError::AboveMax { needed, max }) => {
            assert_eq!(max, input.max);
            assert_eq!(u128::from(needed), wide_needed);
            assert!(wide_needed > u128::from(input.max));
        }
        Err(PolicyError::Overflow) => assert!(wide_millis > u128::from(u64::MAX)),
        Err(e) => panic!("target gave {e:?}"),
    }

    let wide_mib =
        u128::from(input.memory_bytes).div_ceil(1 << 20) + u128::from(input.overhead_mib);
    match guest_memory_mib(input.memory_bytes, input.overhead_mib) {
        Ok(mib) => assert_eq!(u128::from(mib), wide_mib),
        Err(PolicyError::MemoryTooLarge { .. }) => {
            assert!(wide_mib > u128::from(MAX_MEMORY_MIB));
        }
        Err(e) => panic!("guest_memory_mib gave {e:?}"),
    }

    // A container's memory limit as OCI gives it (-1 or 0: none), then against a fixed VM.
    let mut resources = oci_spec::runtime::LinuxResources::default();
    if let Some(l) = input.memory_limit {
        if let Ok(memory) = oci_spec::runtime::LinuxMemoryBuilder::default()
            .limit(l)
            .build()
        {
            resources.set_memory(Some(memory));
        }
    }
    let limit = match memory_limit(&resources) {
        Ok(limit) => {
            match input.memory_limit {
                Some(l) if l > 0 => assert_eq!(limit, u64::try_from(l).ok()),
                _ => assert_eq!(limit, None),
            }
            limit
        }
        Err(PolicyError::MemoryLimit(l)) => {
            assert!(l < -1);
            None
        }
        Err(e) => panic!("memory_limit gave {e:?}"),
    };
    let vm_bytes = u128::from(input.vm_mib) << 20;
    match check_memory_limit(limit, input.vm_mib) {
        Ok(()) => assert!(limit.is_none_or(|l| u128::from(l) <= vm_bytes)),
        Err(PolicyError::MemoryAboveVm { limit, .. }) => assert!(u128::from(limit) > vm_bytes),
        Err(e) => panic!("check_memory_limit gave {e:?}"),
    }

    // The pod's memory target from its containers' limits.
    let pod = PodMemory {
        containers: (0..)
            .map(|i: u32| i.to_string())
            .zip(input.memory_limits.iter().copied())
            .collect(),
        pod: None,
    };
    let sum: u128 = input
        .memory_limits
        .iter()
        .flatten()
        .map(|&l| u128::from(l))
        .sum();
    let needed = sum.div_ceil(1 << 20) + u128::from(input.overhead_mib);
    match pod.target_mib(input.overhead_mib, input.boot_mib, input.max_mib) {
        Ok(mib) => {
            assert!(needed <= u128::from(input.max_mib));
            assert_eq!(u128::from(mib), needed.max(u128::from(input.boot_mib)));
        }
        Err(PolicyError::Overflow) => assert!(sum > u128::from(u64::MAX)),
        Err(PolicyError::MemoryTooLarge { .. }) => assert!(needed > u128::from(MAX_MEMORY_MIB)),
        Err(PolicyError::MemoryAboveMax { needed_mib, .. }) => {
            assert_eq!(u128::from(needed_mib), needed);
            assert!(needed > u128::from(input.max_mib));
        }
        Err(e) => panic!("target_mib gave {e:?}"),
    }
});
