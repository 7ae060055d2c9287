//! Guest facts for GetGuestInfo: kernel release, CPU sets from sysfs, memory and uptime from procfs.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors reading guest facts.
#[derive(Debug, thiserror::Error)]
pub enum SysinfoError {
    /// A procfs/sysfs file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file did not have the expected format.
    #[error("Unexpected content in {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// uname(2) failed.
    #[error("uname failed")]
    Uname(#[source] nix::Error),
}

/// A Linux cpulist ("0-3,8,10-11"), as in /sys/devices/system/cpu/online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList {
    /// The text, trimmed.
    pub text: String,
    /// How many CPUs it names.
    pub count: u32,
}

impl CpuList {
    /// Parses a cpulist. An empty string is an empty set (a kernel writes "\n" for no CPUs).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let mut count: u32 = 0;
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (parse_cpu(a)?, parse_cpu(b)?),
                None => (parse_cpu(part)?, parse_cpu(part)?),
            };
            if last < first {
                return Err(format!("descending range {part:?}"));
            }
            count = (last - first)
                .checked_add(1)
                .and_then(|n| count.checked_add(n))
                .ok_or_else(|| format!("range {part:?} too large"))?;
        }
        Ok(CpuList {
            text: text.to_owned(),
            count,
        })
    }
}

/// The most CPUs a cpulist may name when expanded into numbers: Linux's largest NR_CPUS (8192 on
/// x86_64; arm64 allows 4096). A list naming more is garbage and is refused instead of allocated.
pub const MAX_CPUS: u32 = 8192;

/// Expands a cpulist ("0-3,8") into its CPU numbers, sorted ascending and without duplicates.
pub fn parse_cpu_set(text: &str) -> Result<Vec<u32>, String> {
    let list = CpuList::parse(text)?;
    if list.count > MAX_CPUS {
        return Err(format!("names {} CPUs, more than {MAX_CPUS}", list.count));
    }
    let mut cpus = Vec::new();
    for part in list.text.split(',').filter(|p| !p.is_empty()) {
        // CpuList::parse accepted every part already.
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (parse_cpu(a)?, parse_cpu(b)?),
            None => (parse_cpu(part)?, parse_cpu(part)?),
        };
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats CPU numbers as the kernel writes a cpulist ("0-3,8"); the order of `cpus` and
/// duplicates in it do not matter.
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut text = String::new();
    let mut i = 0;
    while let Some(&first) = sorted.get(i) {
        let mut last = first;
        while let Some(&next) = sorted
            .get(i + 1)
            .filter(|&&n| Some(n) == last.checked_add(1))
        {
            last = next;
            i += 1;
        }
        if !text.is_empty() {
            text.push(',');
        }
        if first == last {
            text.push_str(&first.to_string());
        } else {
            text.push_str(&format!("{first}-{last}"));
        }
        i += 1;
    }
    text
}

fn parse_cpu(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("{s:?} is not a CPU number"))
}

/// Everything GetGuestInfo reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// /sys/devices/system/cpu/possible.
    pub cpus_possible: CpuList,
    /// /sys/devices/system/cpu/present.
    pub cpus_present: CpuList,
    /// /sys/devices/system/cpu/online.
    pub cpus_online: CpuList,
    /// MemTotal, bytes.
    pub memory_total_bytes: u64,
    /// MemAvailable, bytes.
    pub memory_available_bytes: u64,
    /// Since boot, milliseconds.
    pub uptime_ms: u64,
}

impl From<GuestInfo> for accordion_proto::agent::v1::GetGuestInfoResponse {
    fn from(info: GuestInfo) -> Self {
        Self {
            kernel_release: info.kernel_release,
            cpus_possible: info.cpus_possible.text,
            cpus_present: info.cpus_present.text,
            cpus_online: info.cpus_online.text,
            cpus_possible_count: info.cpus_possible.count,
            cpus_present_count: info.cpus_present.count,
            cpus_online_count: info.cpus_online.count,
            memory_total_bytes: info.memory_total_bytes,
            memory_available_bytes: info.memory_available_bytes,
            uptime_ms: info.uptime_ms,
            agent_version: crate::AGENT_VERSION.to_owned(),
            // The boot's share mount is the Agent service's to report.
            share_tag: String::new(),
            share_error: String::new(),
        }
    }
}

fn read(path: &Path) -> Result<String, SysinfoError> {
    fs::read_to_string(path).map_err(|source| SysinfoError::Read {
        path: path.to_owned(),
        source,
    })
}

fn cpulist(root: &Path, name: &str) -> Result<CpuList, SysinfoError> {
    let path = root.join("sys/devices/system/cpu").join(name);
    let text = read(&path)?;
    CpuList::parse(&text).map_err(|detail| SysinfoError::Parse { path, detail })
}

/// Parses /proc/meminfo's MemTotal and MemAvailable (kB) into bytes.
pub fn parse_meminfo(text: &str) -> Result<(u64, u64), String> {
    let field = |name: &str| -> Result<u64, String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
            .ok_or_else(|| format!("no {name}"))?;
        let kb = line.trim().trim_end_matches("kB").trim();
        let kb: u64 = kb
            .parse()
            .map_err(|_| format!("{name} {kb:?} is not a number"))?;
        kb.checked_mul(1024)
            .ok_or_else(|| format!("{name} overflows"))
    };
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

/// Parses /proc/uptime's first field (seconds, with a fraction) into milliseconds.
pub fn parse_uptime(text: &str) -> Result<u64, String> {
    let secs = text.split_whitespace().next().ok_or("empty")?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("{secs:?} is not a number"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{secs} is not an uptime"));
    }
    // Saturating float → int conversion is intended: an uptime never nears u64::MAX ms.
    Ok((secs * 1000.0) as u64)
}

/// Reads the guest facts from procfs and sysfs under `root` ("/" in the guest; a fixture in tests).
pub fn read_guest_info(root: &Path) -> Result<GuestInfo, SysinfoError> {
    let kernel_release = nix::sys::utsname::uname()
        .map_err(SysinfoError::Uname)?
        .release()
        .to_string_lossy()
        .into_owned();
    let meminfo_path = root.join("proc/meminfo");
    let (memory_total_bytes, memory_available_bytes) = parse_meminfo(&read(&meminfo_path)?)
        .map_err(|detail| SysinfoError::Parse {
            path: meminfo_path,
            detail,
        })?;
    let uptime_path = root.join("proc/uptime");
    let uptime_ms = parse_uptime(&read(&uptime_path)?).map_err(|detail| SysinfoError::Parse {
        path: uptime_path,
        detail,
    })?;
    Ok(GuestInfo {
        kernel_release,
        cpus_possible: cpulist(root, "possible")?,
        cpus_present: cpulist(root, "present")?,
        cpus_online: cpulist(root, "online")?,
        memory_total_bytes,
        memory_available_bytes,
        uptime_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cpulist_ranges_and_singles_counted() {
        assert_eq!(
            CpuList::parse("0-3,8,10-11\n"),
            Ok(CpuList {
                text: "0-3,8,10-11".into(),
                count: 7
            })
        );
    }

    #[test]
    fn test_cpulist_empty_is_zero() {
        assert_eq!(CpuList::parse("\n").map(|l| l.count), Ok(0));
    }

    #[test]
    fn test_cpulist_garbage_rejected() {
        assert!(CpuList::parse("0-x").is_err());
        assert!(CpuList::parse("3-1").is_err());
        assert!(CpuList::parse("0-4294967295").is_err());
    }

    #[test]
    fn test_parse_cpu_set_expands_ranges_sorted() {
        assert_eq!(
            parse_cpu_set("8,0-3,10-11\n"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_set("\n"), Ok(vec![]));
    }

    #[test]
    fn test_parse_cpu_set_refuses_more_than_max_cpus() {
        assert!(parse_cpu_set("0-8191").is_ok());
        assert!(parse_cpu_set("0-8192").is_err());
        assert!(parse_cpu_set("0-4294967294").is_err());
        assert!(parse_cpu_set("1,x").is_err());
    }

    #[test]
    fn test_format_cpulist_matches_kernel_format() {
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[5, 0, 1, 5]), "0-1,5");
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(
            format_cpulist(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
    }

    #[test]
    fn test_format_then_parse_roundtrips() {
        let cpus = vec![0, 2, 3, 4, 7, 64, 65, 127];
        assert_eq!(parse_cpu_set(&format_cpulist(&cpus)), Ok(cpus));
    }

    #[test]
    fn test_meminfo_parsed_to_bytes() {
        let text = "MemTotal:        2030000 kB\nMemFree:  1 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(parse_meminfo(text), Ok((2030000 * 1024, 1500000 * 1024)));
    }

    #[test]
    fn test_meminfo_missing_field_rejected() {
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn test_uptime_parsed_to_ms() {
        assert_eq!(parse_uptime("12.34 40.00\n"), Ok(12340));
        assert!(parse_uptime("nan 1").is_err());
    }

    #[test]
    fn test_read_guest_info_from_fixture_root() {
        let root = std::env::temp_dir().join(format!("accordion-sysinfo-{}", std::process::id()));
        let cpu = root.join("sys/devices/system/cpu");
        fs::create_dir_all(&cpu).expect("mkdir");
        fs::create_dir_all(root.join("proc")).expect("mkdir");
        fs::write(cpu.join("possible"), "0-7\n").expect("write");
        fs::write(cpu.join("present"), "0-3\n").expect("write");
        fs::write(cpu.join("online"), "0\n").expect("write");
        fs::write(
            root.join("proc/meminfo"),
            "MemTotal: 4 kB\nMemAvailable: 2 kB\n",
        )
        .expect("write");
        fs::write(root.join("proc/uptime"), "1.5 0.1\n").expect("write");
        let info = read_guest_info(&root).expect("info");
        fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            (
                info.cpus_possible.count,
                info.cpus_present.count,
                info.cpus_online.count
            ),
            (8, 4, 1)
        );
        assert_eq!(
            (
                info.memory_total_bytes,
                info.memory_available_bytes,
                info.uptime_ms
            ),
            (4096, 2048, 1500)
        );
    }
}
