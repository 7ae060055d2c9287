//! A container's cgroup v2: OCI LinuxResources translated to interface-file writes (Update), and
//! its counters read back (Stats). Kept as plain functions over a directory so they are unit
//! tested on a temporary directory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

/// cpu.max's period when the spec gives a quota without one (the kernel's default).
pub const DEFAULT_PERIOD_US: u64 = 100_000;

/// Errors of a cgroup operation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Not JSON, or not OCI LinuxResources.
    #[error("The resources are not valid OCI LinuxResources")]
    Parse(#[source] serde_json::Error),
    /// A value the kernel would refuse (or that means nothing).
    #[error("Invalid resources: {0}")]
    Invalid(String),
    /// Writing an interface file failed.
    #[error("Cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading an interface file failed.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One interface-file write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// File name in the cgroup directory.
    pub file: &'static str,
    /// Content.
    pub value: String,
}

fn write(file: &'static str, value: impl Into<String>) -> Write {
    Write {
        file,
        value: value.into(),
    }
}

/// cgroup v1 cpu.shares (2..=262144) → v2 cpu.weight (1..=10000), the formula runc, crun and
/// youki share, so a pod gets the same weight whichever runtime runs it.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn is_cpu_list(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut ends = part.splitn(2, '-');
            ends.all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Parses LinuxResources JSON.
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, CgroupError> {
    serde_json::from_slice(json).map_err(CgroupError::Parse)
}

/// The writes that apply `res`, in a safe order (cpuset before cpu, memory last). Fields the
/// agent does not manage (devices, blockIO, hugepages, network, rdma, unified) are left alone:
/// containerd sends the whole LinuxResources on every update.
pub fn resource_writes(res: &LinuxResources) -> Result<Vec<Write>, CgroupError> {
    let mut writes = Vec::new();
    if let Some(cpu) = res.cpu() {
        if let Some(cpus) = cpu.cpus().as_deref().filter(|s| !s.is_empty()) {
            if !is_cpu_list(cpus) {
                return Err(CgroupError::Invalid(format!(
                    "cpus {cpus:?} is not a cpu list"
                )));
            }
            writes.push(write("cpuset.cpus", cpus));
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|s| !s.is_empty()) {
            if !is_cpu_list(mems) {
                return Err(CgroupError::Invalid(format!(
                    "mems {mems:?} is not a node list"
                )));
            }
            writes.push(write("cpuset.mems", mems));
        }
        if let Some(shares) = cpu.shares().filter(|&s| s != 0) {
            writes.push(write("cpu.weight", shares_to_weight(shares).to_string()));
        }
        let period = cpu.period().filter(|&p| p != 0);
        if let Some(p) = period {
            if !(1_000..=1_000_000).contains(&p) {
                return Err(CgroupError::Invalid(format!(
                    "cpu period {p} is outside 1000..=1000000 µs"
                )));
            }
        }
        match cpu.quota() {
            // 0 means "unset" in OCI; negative means unlimited.
            Some(q) if q > 0 => {
                if q < 1_000 {
                    return Err(CgroupError::Invalid(format!(
                        "cpu quota {q} is below 1000 µs"
                    )));
                }
                let p = period.unwrap_or(DEFAULT_PERIOD_US);
                writes.push(write("cpu.max", format!("{q} {p}")));
            }
            Some(q) if q < 0 => {
                let p = period.unwrap_or(DEFAULT_PERIOD_US);
                writes.push(write("cpu.max", format!("max {p}")));
            }
            _ => {
                if let Some(p) = period {
                    // Only the period changes; "max" would drop an existing quota, so keep it
                    // out: the kernel accepts a lone period only with the quota, so write both
                    // from what is there at apply time (see `apply`).
                    writes.push(write("cpu.max", format!("$quota {p}")));
                }
            }
        }
    }
    if let Some(pids) = res.pids() {
        let limit = pids.limit();
        let value = if limit > 0 {
            limit.to_string()
        } else {
            "max".to_owned()
        };
        writes.push(write("pids.max", value));
    }
    if let Some(memory) = res.memory() {
        match memory.limit() {
            Some(l) if l > 0 => writes.push(write("memory.max", l.to_string())),
            Some(l) if l < 0 => writes.push(write("memory.max", "max")),
            _ => {}
        }
    }
    Ok(writes)
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `writes` into the cgroup `dir`, stopping at the first failure.
pub fn apply(dir: &Path, writes: &[Write]) -> Result<(), CgroupError> {
    for w in writes {
        let path = dir.join(w.file);
        let value = match w.value.strip_prefix("$quota ") {
            // A period alone: keep the current quota.
            Some(period) => {
                let current = read(&path)?;
                let quota = current
                    .split_whitespace()
                    .next()
                    .unwrap_or("max")
                    .to_owned();
                format!("{quota} {period}")
            }
            None => w.value.clone(),
        };
        fs::write(&path, &value).map_err(|source| CgroupError::Write {
            path: path.clone(),
            value,
            source,
        })?;
    }
    Ok(())
}

/// A container's cgroup counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// cpu.stat user_usec.
    pub cpu_user_usec: u64,
    /// cpu.stat system_usec.
    pub cpu_system_usec: u64,
    /// cpu.stat nr_periods.
    pub cpu_nr_periods: u64,
    /// cpu.stat nr_throttled.
    pub cpu_nr_throttled: u64,
    /// cpu.stat throttled_usec.
    pub cpu_throttled_usec: u64,
    /// memory.current.
    pub memory_current: u64,
    /// memory.max, None for "max".
    pub memory_max: Option<u64>,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max, None for "max".
    pub pids_max: Option<u64>,
    /// cpu.max as the kernel shows it.
    pub cpu_max: String,
    /// cpu.weight.
    pub cpu_weight: u64,
}

/// The value of `key` in a flat-keyed file ("key value" lines, like cpu.stat).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Reads the counters of the cgroup `dir`. A controller that is not enabled there leaves its
/// fields at zero (or unset) rather than failing the call; cgroup.procs must exist.
pub fn read_stats(dir: &Path) -> Result<Stats, CgroupError> {
    read(&dir.join("cgroup.procs"))?;
    let opt = |file: &str| fs::read_to_string(dir.join(file)).unwrap_or_default();
    let cpu_stat = opt("cpu.stat");
    let stat = |key| keyed(&cpu_stat, key).unwrap_or(0);
    Ok(Stats {
        cpu_usage_usec: stat("usage_usec"),
        cpu_user_usec: stat("user_usec"),
        cpu_system_usec: stat("system_usec"),
        cpu_nr_periods: stat("nr_periods"),
        cpu_nr_throttled: stat("nr_throttled"),
        cpu_throttled_usec: stat("throttled_usec"),
        memory_current: limit(&opt("memory.current")).unwrap_or(0),
        memory_max: limit(&opt("memory.max")),
        pids_current: limit(&opt("pids.current")).unwrap_or(0),
        pids_max: limit(&opt("pids.max")),
        cpu_max: opt("cpu.max").trim().to_owned(),
        cpu_weight: limit(&opt("cpu.weight")).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(json: &str) -> LinuxResources {
        parse_resources(json.as_bytes()).expect("resources")
    }

    #[test]
    fn test_resource_writes_quota_period_shares_cpuset_memory() {
        let writes = resource_writes(&res(
            r#"{"cpu": {"quota": 50000, "period": 100000, "shares": 1024, "cpus": "0-1", "mems": "0"},
                "memory": {"limit": 268435456}, "pids": {"limit": 100}}"#,
        ))
        .expect("writes");
        assert_eq!(
            writes,
            vec![
                write("cpuset.cpus", "0-1"),
                write("cpuset.mems", "0"),
                write("cpu.weight", "39"),
                write("cpu.max", "50000 100000"),
                write("pids.max", "100"),
                write("memory.max", "268435456"),
            ]
        );
    }

    #[test]
    fn test_resource_writes_unlimited_values() {
        let writes = resource_writes(&res(
            r#"{"cpu": {"quota": -1}, "memory": {"limit": -1}, "pids": {"limit": 0}}"#,
        ))
        .expect("writes");
        assert_eq!(
            writes,
            vec![
                write("cpu.max", "max 100000"),
                write("pids.max", "max"),
                write("memory.max", "max")
            ]
        );
    }

    #[test]
    fn test_resource_writes_empty_is_nothing() {
        assert_eq!(resource_writes(&res("{}")).expect("writes"), vec![]);
    }

    #[test]
    fn test_resource_writes_rejects_bad_values() {
        for bad in [
            r#"{"cpu": {"quota": 10}}"#,
            r#"{"cpu": {"quota": 50000, "period": 10}}"#,
            r#"{"cpu": {"cpus": "0;rm"}}"#,
            r#"{"cpu": {"mems": "a"}}"#,
        ] {
            let err = resource_writes(&res(bad)).expect_err(bad);
            assert!(matches!(err, CgroupError::Invalid(_)), "{bad}: {err:?}");
        }
        assert!(matches!(
            parse_resources(b"{\"cpu\": 1}"),
            Err(CgroupError::Parse(_))
        ));
    }

    #[test]
    fn test_shares_to_weight_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
    }

    #[test]
    fn test_apply_and_read_stats_on_a_directory() {
        let dir = std::env::temp_dir().join(format!("accordion-cg-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("cgroup.procs"), "").expect("procs");
        fs::write(dir.join("cpu.max"), "20000 100000\n").expect("cpu.max");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 10\nuser_usec 6\nsystem_usec 4\nnr_periods 3\nnr_throttled 1\nthrottled_usec 7\n",
        )
        .expect("cpu.stat");
        fs::write(dir.join("memory.max"), "max\n").expect("memory.max");
        fs::write(dir.join("pids.current"), "2\n").expect("pids");
        let writes = resource_writes(&res(r#"{"cpu": {"period": 50000}}"#)).expect("writes");
        apply(&dir, &writes).expect("apply");
        let stats = read_stats(&dir).expect("stats");
        fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(stats.cpu_max, "20000 50000");
        assert_eq!(stats.cpu_usage_usec, 10);
        assert_eq!(stats.cpu_throttled_usec, 7);
        assert_eq!(stats.memory_max, None);
        assert_eq!(stats.pids_current, 2);
    }

    #[test]
    fn test_read_stats_missing_cgroup_is_error() {
        assert!(read_stats(Path::new("/nonexistent/accordion")).is_err());
    }
}
