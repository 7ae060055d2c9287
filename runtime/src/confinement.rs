//! What confines the process that runs a pod's VM, read back from the kernel (`/proc/<pid>`):
//! its ids, effective capabilities, no_new_privs, seccomp mode on each thread, the namespaces it
//! shares with the host and its cgroup. `accordion status` shows it and the shim logs it at start,
//! so an operator sees what a guest that escaped the VMM would hold, not what we meant to set
//! (docs/security.md).

use std::fs;
use std::io;
use std::path::Path;

/// Namespaces compared with pid 1's: equal means the process shares the host's.
pub const NAMESPACES: [&str; 7] = ["mnt", "pid", "net", "user", "ipc", "uts", "cgroup"];

/// All 41 capabilities of Linux 5.9+ (CAP_CHECKPOINT_RESTORE is 40).
const ALL_CAPS: u64 = (1 << 41) - 1;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Confinement {
    /// Real and effective user id, as the host sees them.
    pub uid: (u32, u32),
    pub gid: (u32, u32),
    /// CapEff of the main thread.
    pub cap_eff: u64,
    pub no_new_privs: bool,
    /// Threads in seccomp filter mode (2), and all threads.
    pub seccomp_threads: u32,
    pub threads: u32,
    /// Namespaces shared with pid 1 and those of its own, from [`NAMESPACES`].
    pub host_namespaces: Vec<String>,
    pub own_namespaces: Vec<String>,
    /// Those that could not be compared (pid 1's links unreadable).
    pub unknown_namespaces: Vec<String>,
    /// The unified (v2) cgroup path, "" without one.
    pub cgroup: String,
}

/// What `/proc/<pid>/status` says that matters here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Status {
    uid: (u32, u32),
    gid: (u32, u32),
    cap_eff: u64,
    no_new_privs: bool,
    seccomp: u32,
}

impl Confinement {
    /// Reads the confinement of process `pid` (and of each of its threads).
    pub fn of(pid: u32) -> io::Result<Self> {
        let proc = Path::new("/proc").join(pid.to_string());
        let main = parse_status(&fs::read_to_string(proc.join("status"))?)?;
        let (mut threads, mut seccomp_threads) = (0, 0);
        for task in fs::read_dir(proc.join("task"))? {
            // A thread that ended while we listed them is simply gone.
            let Ok(text) = fs::read_to_string(task?.path().join("status")) else {
                continue;
            };
            threads += 1;
            if parse_status(&text)?.seccomp == 2 {
                seccomp_threads += 1;
            }
        }
        let (mut host_namespaces, mut own_namespaces, mut unknown_namespaces) =
            (Vec::new(), Vec::new(), Vec::new());
        for ns in NAMESPACES {
            let ours = fs::read_link(proc.join("ns").join(ns));
            // Some containers deny even root pid 1's links: the comparison is then unknown, not a
            // guess.
            let host = fs::read_link(Path::new("/proc/1/ns").join(ns));
            match (ours, host) {
                (Ok(ours), Ok(host)) if ours == host => host_namespaces.push(ns.to_owned()),
                (Ok(_), Ok(_)) => own_namespaces.push(ns.to_owned()),
                _ => unknown_namespaces.push(ns.to_owned()),
            }
        }
        Ok(Self {
            uid: main.uid,
            gid: main.gid,
            cap_eff: main.cap_eff,
            no_new_privs: main.no_new_privs,
            seccomp_threads,
            threads,
            host_namespaces,
            own_namespaces,
            unknown_namespaces,
            cgroup: unified_cgroup(&fs::read_to_string(proc.join("cgroup"))?),
        })
    }

    /// One line, for the shim's log.
    pub fn summary(&self) -> String {
        format!(
            "uid {}, capabilities {}, no_new_privs {}, seccomp {}, host namespaces [{}], cgroup {}",
            self.uid.1,
            describe_caps(self.cap_eff),
            u8::from(self.no_new_privs),
            describe_seccomp(self.seccomp_threads, self.threads),
            self.host_namespaces.join(" "),
            if self.cgroup.is_empty() {
                "none"
            } else {
                &self.cgroup
            },
        )
    }
}

/// "all", "none" or the hex mask.
pub fn describe_caps(cap_eff: u64) -> String {
    match cap_eff {
        0 => "none".into(),
        c if c & ALL_CAPS == ALL_CAPS => format!("all ({c:016x})"),
        c => format!("{c:016x}"),
    }
}

/// "filter on every thread (n)", "off", or how many of how many.
pub fn describe_seccomp(filtered: u32, threads: u32) -> String {
    match filtered {
        0 => "off".into(),
        n if n == threads => format!("filter on every thread ({n})"),
        n => format!("filter on {n} of {threads} threads"),
    }
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("/proc status: no readable {what}"),
    )
}

/// Real and effective ids from a "Uid:"/"Gid:" line (real, effective, saved, fs).
fn ids(text: &str, key: &str) -> io::Result<(u32, u32)> {
    let mut it = field(text, key)
        .ok_or_else(|| bad(key))?
        .split_whitespace()
        .map(str::parse::<u32>);
    match (it.next(), it.next()) {
        (Some(Ok(real)), Some(Ok(eff))) => Ok((real, eff)),
        _ => Err(bad(key)),
    }
}

fn parse_status(text: &str) -> io::Result<Status> {
    let cap_eff = field(text, "CapEff")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| bad("CapEff"))?;
    // Both lines exist since Linux 4.10; absent means neither is set.
    let number = |key| field(text, key).and_then(|v| v.parse::<u32>().ok());
    Ok(Status {
        uid: ids(text, "Uid")?,
        gid: ids(text, "Gid")?,
        cap_eff,
        no_new_privs: number("NoNewPrivs") == Some(1),
        seccomp: number("Seccomp").unwrap_or(0),
    })
}

/// The "0::<path>" line of /proc/<pid>/cgroup (cgroup v2), "" when there is none.
fn unified_cgroup(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines of a real /proc/<pid>/status (Linux 6.12), the fields around ours included.
    const ROOT_STATUS: &str = "Name:\tcontainerd-shim\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t412\nPid:\t412\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\n\
        Seccomp_filters:\t0\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn test_status_of_an_unconfined_root_process() {
        let s = parse_status(ROOT_STATUS).unwrap();
        assert_eq!(s.uid, (0, 0));
        assert_eq!(s.cap_eff, 0x1ff_ffff_ffff);
        assert!(!s.no_new_privs);
        assert_eq!(s.seccomp, 0);
        assert_eq!(describe_caps(s.cap_eff), "all (000001ffffffffff)");
    }

    #[test]
    fn test_status_of_a_jailed_thread() {
        let text = ROOT_STATUS
            .replace("Uid:\t0\t0\t0\t0", "Uid:\t100000\t100001\t100001\t100001")
            .replace("CapEff:\t000001ffffffffff", "CapEff:\t0000000000000000")
            .replace("NoNewPrivs:\t0", "NoNewPrivs:\t1")
            .replace("Seccomp:\t0", "Seccomp:\t2");
        let s = parse_status(&text).unwrap();
        assert_eq!(s.uid, (100000, 100001));
        assert_eq!(describe_caps(s.cap_eff), "none");
        assert!(s.no_new_privs);
        assert_eq!(s.seccomp, 2);
    }

    #[test]
    fn test_status_without_readable_ids_or_caps_is_an_error() {
        assert!(parse_status("Name:\tx\nCapEff:\t0\n").is_err());
        assert!(
            parse_status(&ROOT_STATUS.replace("CapEff:\t000001ffffffffff", "CapEff:\tzz")).is_err()
        );
        assert!(parse_status(&ROOT_STATUS.replace("Uid:\t0\t0\t0\t0", "Uid:\t0")).is_err());
    }

    #[test]
    fn test_seccomp_and_cgroup_descriptions() {
        assert_eq!(describe_seccomp(0, 9), "off");
        assert_eq!(describe_seccomp(9, 9), "filter on every thread (9)");
        assert_eq!(describe_seccomp(3, 9), "filter on 3 of 9 threads");
        assert_eq!(describe_caps(0x3000), "0000000000003000");
        assert_eq!(
            unified_cgroup("0::/kubepods/pod1/abc\n"),
            "/kubepods/pod1/abc"
        );
        assert_eq!(unified_cgroup("1:name=systemd:/x\n"), "");
    }

    #[test]
    fn test_own_process_reads_as_the_kernel_says() {
        let c = Confinement::of(std::process::id()).unwrap();
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        assert_eq!(c.uid.0, uid);
        assert!(c.threads >= 1);
        assert!(c.seccomp_threads <= c.threads);
        let compared = c.host_namespaces.len() + c.own_namespaces.len();
        assert_eq!(compared + c.unknown_namespaces.len(), NAMESPACES.len());
        assert!(c.summary().starts_with(&format!("uid {}", c.uid.1)));
    }
}
