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
    check_memory_limit, guest_memory_mib, CpuShape, PodCpu, PolicyError,
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

    let vm_bytes = i128::from(input.vm_mib) << 20;
    match check_memory_limit(input.memory_limit, input.vm_mib) {
        Ok(()) => assert!(input
            .memory_limit
            .is_none_or(|l| l >= -1 && i128::from(l) <= vm_bytes)),
        Err(PolicyError::MemoryLimit(l)) => assert!(l < -1),
        Err(PolicyError::MemoryAboveVm { limit, .. }) => assert!(i128::from(limit) > vm_bytes),
        Err(e) => panic!("check_memory_limit gave {e:?}"),
    }
});
