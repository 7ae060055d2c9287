//! A container's cgroup v2: OCI LinuxResources translated to interface-file writes (Update), its
//! counters read back (Stats), its processes (Pids), and the freezer (Pause). Kept as plain
//! functions over a directory so they are unit tested on a temporary directory; waiting for the
//! kernel to report a change is [`super::events`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use accordion_proto::agent::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
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
    /// An interface file did not have the expected format.
    #[error("Unexpected content in {path}: {detail}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A signal could not be sent to a process of the cgroup.
    #[error("Cannot send {signal} to pid {pid}")]
    Signal {
        /// The signal.
        signal: Signal,
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// The freezer's control file: "1" freezes the cgroup, "0" thaws it.
pub const FREEZE: &str = "cgroup.freeze";
/// The cgroup's state: "populated" and "frozen" (0/1), with IN_MODIFY on every change.
pub const EVENTS: &str = "cgroup.events";
/// The memory controller's event counters, with IN_MODIFY on every change.
pub const MEMORY_EVENTS: &str = "memory.events";
/// Writing "1" SIGKILLs every process of the cgroup and its descendants (Linux 5.14+).
pub const KILL: &str = "cgroup.kill";

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
    /// cpu.stat nr_bursts.
    pub cpu_nr_bursts: u64,
    /// cpu.stat burst_usec.
    pub cpu_burst_usec: u64,
    /// memory.stat.
    pub memory_stat: MemoryStat,
    /// memory.events.
    pub memory_events: MemoryEvents,
    /// memory.swap.current, None without swap accounting.
    pub memory_swap_current: Option<u64>,
    /// memory.swap.max, None for "max" or without swap accounting.
    pub memory_swap_max: Option<u64>,
    /// memory.peak, None when the kernel has no such file.
    pub memory_peak: Option<u64>,
}

/// A struct of u64 counters named like the keys of a flat-keyed cgroup file ("key value" lines),
/// its parser, and its conversion to the wire message with the same field names.
macro_rules! flat_keyed {
    ($(#[$meta:meta])* $name:ident => $wire:path { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub struct $name {
            $(pub $field: u64,)*
        }

        impl $name {
            /// The fields found in `text`; keys that are absent (an older kernel) stay zero, and
            /// keys this struct does not name are ignored.
            pub fn parse(text: &str) -> Self {
                let mut parsed = Self::default();
                for line in text.lines() {
                    let Some((key, value)) = line.split_once(' ') else {
                        continue;
                    };
                    let Ok(value) = value.trim().parse() else {
                        continue;
                    };
                    match key {
                        $(stringify!($field) => parsed.$field = value,)*
                        _ => {}
                    }
                }
                parsed
            }
        }

        impl From<$name> for $wire {
            fn from(v: $name) -> Self {
                Self { $($field: v.$field,)* }
            }
        }
    };
}

flat_keyed! {
    /// memory.stat: the keys containerd's cgroup v2 MemoryStat carries (sizes in bytes, pg* and
    /// thp_* as event counts).
    MemoryStat => pb::MemoryStat {
        anon, file, kernel_stack, slab, sock, shmem, file_mapped, file_dirty, file_writeback,
        anon_thp, inactive_anon, active_anon, inactive_file, active_file, unevictable,
        slab_reclaimable, slab_unreclaimable, pgfault, pgmajfault, workingset_refault,
        workingset_activate, workingset_nodereclaim, pgrefill, pgscan, pgsteal, pgactivate,
        pgdeactivate, pglazyfree, pglazyfreed, thp_fault_alloc, thp_collapse_alloc,
    }
}

flat_keyed! {
    /// memory.events: how often the cgroup hit memory.low/high/max, ran out of memory, and had a
    /// process (or, with memory.oom.group, the whole group) OOM-killed.
    MemoryEvents => pb::MemoryEvents { low, high, max, oom, oom_kill, oom_group_kill }
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
    let swap_current = opt("memory.swap.current");
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
        cpu_nr_bursts: stat("nr_bursts"),
        cpu_burst_usec: stat("burst_usec"),
        memory_stat: MemoryStat::parse(&opt("memory.stat")),
        memory_events: MemoryEvents::parse(&opt(MEMORY_EVENTS)),
        memory_swap_current: limit(&swap_current),
        memory_swap_max: limit(&opt("memory.swap.max")),
        memory_peak: limit(&opt("memory.peak")),
    })
}

/// Writes `value` to an interface file that must exist (kernfs files cannot be created; on a
/// test directory, a missing file stays missing).
fn write_existing(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write as _;
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// Asks the kernel to freeze (`true`) or thaw the cgroup `dir`. The change is complete only once
/// cgroup.events says so (see [`super::events::wait_keyed`]).
pub fn set_frozen(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    let path = dir.join(FREEZE);
    let value = if frozen { "1" } else { "0" };
    write_existing(&path, value).map_err(|source| CgroupError::Write {
        path,
        value: value.to_owned(),
        source,
    })
}

/// Whether the cgroup `dir` is asked to be frozen (cgroup.freeze reads 1).
pub fn freeze_requested(dir: &Path) -> Result<bool, CgroupError> {
    let path = dir.join(FREEZE);
    match read(&path)?.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(CgroupError::Content {
            path,
            detail: format!("{other:?} is not 0 or 1"),
        }),
    }
}

/// Parses cgroup.procs: one pid per line.
pub fn parse_procs(text: &str) -> Result<Vec<u32>, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| line.parse().map_err(|_| format!("{line:?} is not a pid")))
        .collect()
}

/// The processes of the cgroup `dir` and of every cgroup below it, ascending and without
/// duplicates. `dir` must be a cgroup; a sub-cgroup removed while this runs is skipped.
pub fn all_pids(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let mut pids = Vec::new();
    collect_pids(dir, &mut pids, true)?;
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>, top: bool) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !top && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(CgroupError::Read { path, source }),
    };
    pids.extend(parse_procs(&text).map_err(|detail| CgroupError::Content {
        path: path.clone(),
        detail,
    })?);
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if !top && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_owned(),
                source,
            })
        }
    };
    // Sub-cgroups are the directories; the interface files are regular files.
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_pids(&entry.path(), pids, false)?;
        }
    }
    Ok(())
}

/// Sends `signal` to every process of the cgroup `dir` and its descendants, one by one. Only
/// safe against a fork racing it when the cgroup is frozen. A process that exited meanwhile is
/// not an error.
pub fn signal_all(dir: &Path, signal: Signal) -> Result<(), CgroupError> {
    for pid in all_pids(dir)? {
        let raw = i32::try_from(pid).map_err(|_| CgroupError::Content {
            path: dir.join("cgroup.procs"),
            detail: format!("pid {pid} out of range"),
        })?;
        match kill(Pid::from_raw(raw), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(source) => {
                return Err(CgroupError::Signal {
                    signal,
                    pid,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// SIGKILLs every process of the cgroup `dir` and its descendants, frozen or not: cgroup.kill,
/// or one by one on a kernel without it (the cgroup should be frozen then).
pub fn kill_all(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join(KILL);
    match write_existing(&path, "1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => signal_all(dir, Signal::SIGKILL),
        Err(source) => Err(CgroupError::Write {
            path,
            value: "1".into(),
            source,
        }),
    }
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

    /// A scratch directory standing in for a cgroup, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("accordion-cgroup-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("dir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn test_parse_procs_one_pid_per_line() {
        assert_eq!(parse_procs("12\n7\n\n"), Ok(vec![12, 7]));
        assert_eq!(parse_procs(""), Ok(vec![]));
        assert!(parse_procs("12\nx\n").is_err());
        assert!(parse_procs("-1\n").is_err());
    }

    #[test]
    fn test_all_pids_includes_sub_cgroups_sorted() {
        let cg = Scratch::new("pids");
        fs::write(cg.0.join("cgroup.procs"), "30\n10\n").expect("procs");
        fs::write(cg.0.join("memory.stat"), "anon 1\n").expect("file");
        fs::create_dir_all(cg.0.join("sub/deeper")).expect("sub");
        fs::write(cg.0.join("sub/cgroup.procs"), "20\n").expect("procs");
        fs::write(cg.0.join("sub/deeper/cgroup.procs"), "40\n10\n").expect("procs");
        // A sub-cgroup that went away between listing and reading: skipped.
        fs::create_dir_all(cg.0.join("gone")).expect("gone");
        assert_eq!(all_pids(&cg.0).expect("pids"), vec![10, 20, 30, 40]);
    }

    #[test]
    fn test_all_pids_missing_cgroup_or_garbage_is_error() {
        assert!(all_pids(Path::new("/nonexistent/accordion")).is_err());
        let cg = Scratch::new("garbage");
        fs::write(cg.0.join("cgroup.procs"), "1\nabc\n").expect("procs");
        assert!(matches!(all_pids(&cg.0), Err(CgroupError::Content { .. })));
    }

    #[test]
    fn test_memory_stat_parse_known_keys_and_ignores_others() {
        let text = "anon 4096\nfile 8192\nkernel_stack 16384\nslab 100\nsock 0\nshmem 12\n\
                    file_mapped 5\nfile_dirty 6\npgfault 77\npgmajfault 3\n\
                    thp_collapse_alloc 2\nzswap 99\nbroken line\nanon_thp x\n";
        let stat = MemoryStat::parse(text);
        assert_eq!(
            (
                stat.anon,
                stat.file,
                stat.kernel_stack,
                stat.slab,
                stat.shmem
            ),
            (4096, 8192, 16384, 100, 12)
        );
        assert_eq!(
            (
                stat.file_mapped,
                stat.file_dirty,
                stat.pgfault,
                stat.pgmajfault
            ),
            (5, 6, 77, 3)
        );
        assert_eq!((stat.thp_collapse_alloc, stat.anon_thp), (2, 0));
        let wire = pb::MemoryStat::from(stat);
        assert_eq!((wire.anon, wire.pgfault), (4096, 77));
    }

    #[test]
    fn test_memory_events_parse() {
        let events =
            MemoryEvents::parse("low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\n");
        assert_eq!(
            events,
            MemoryEvents {
                low: 1,
                high: 2,
                max: 3,
                oom: 4,
                oom_kill: 5,
                oom_group_kill: 6
            }
        );
        assert_eq!(MemoryEvents::parse("").oom_kill, 0);
    }

    #[test]
    fn test_read_stats_memory_files_and_absent_swap() {
        let cg = Scratch::new("memstats");
        fs::write(cg.0.join("cgroup.procs"), "").expect("procs");
        fs::write(cg.0.join("memory.stat"), "anon 10\nfile 20\n").expect("stat");
        fs::write(cg.0.join("memory.events"), "max 2\noom 1\noom_kill 1\n").expect("events");
        fs::write(cg.0.join("memory.peak"), "123\n").expect("peak");
        fs::write(
            cg.0.join("cpu.stat"),
            "usage_usec 1\nnr_bursts 4\nburst_usec 9\n",
        )
        .expect("cpu");
        let stats = read_stats(&cg.0).expect("stats");
        assert_eq!((stats.memory_stat.anon, stats.memory_stat.file), (10, 20));
        assert_eq!(
            (stats.memory_events.max, stats.memory_events.oom_kill),
            (2, 1)
        );
        assert_eq!(stats.memory_peak, Some(123));
        assert_eq!(
            (stats.memory_swap_current, stats.memory_swap_max),
            (None, None)
        );
        assert_eq!((stats.cpu_nr_bursts, stats.cpu_burst_usec), (4, 9));
    }

    #[test]
    fn test_set_frozen_and_freeze_requested_on_a_directory() {
        let cg = Scratch::new("freeze");
        fs::write(cg.0.join(FREEZE), "0\n").expect("freeze");
        assert!(!freeze_requested(&cg.0).expect("read"));
        set_frozen(&cg.0, true).expect("freeze");
        assert!(freeze_requested(&cg.0).expect("read"));
        set_frozen(&cg.0, false).expect("thaw");
        assert!(!freeze_requested(&cg.0).expect("read"));
    }

    #[test]
    fn test_set_frozen_without_freezer_file_is_error_and_creates_nothing() {
        let cg = Scratch::new("nofreeze");
        assert!(set_frozen(&cg.0, true).is_err());
        assert!(!cg.0.join(FREEZE).exists());
        fs::write(cg.0.join(FREEZE), "2\n").expect("freeze");
        assert!(matches!(
            freeze_requested(&cg.0),
            Err(CgroupError::Content { .. })
        ));
    }

    #[test]
    fn test_kill_all_on_an_empty_cgroup_without_cgroup_kill_signals_nobody() {
        let cg = Scratch::new("kill");
        fs::write(cg.0.join("cgroup.procs"), "").expect("procs");
        kill_all(&cg.0).expect("kill");
        assert!(!cg.0.join(KILL).exists());
    }

    #[test]
    fn test_read_stats_missing_cgroup_is_error() {
        assert!(read_stats(Path::new("/nonexistent/accordion")).is_err());
    }
}
