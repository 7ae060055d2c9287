//! Kernel uevent messages as they arrive on a NETLINK_KOBJECT_UEVENT socket (multicast group 1).
//!
//! The kernel (lib/kobject_uevent.c, `kobject_uevent_net_broadcast`) sends one datagram per event:
//! a header `ACTION@DEVPATH\0` followed by the event's environment, `KEY=VALUE\0` per variable
//! (`ACTION`, `DEVPATH`, `SUBSYSTEM`, `SEQNUM`, and for CPUs `MODALIAS`), at most 2048 bytes of
//! them (UEVENT_BUFFER_SIZE). udev re-broadcasts on group 2 in its own binary format, which starts
//! with `libudev\0`; we never subscribe to that group, but refuse the format anyway.
//!
//! Anything else is refused with an error, never a panic: the messages come from the kernel, but
//! the agent is PID 1 and must outlive any message it cannot make sense of.

/// Why a datagram is not a uevent we understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UeventError {
    /// The datagram is empty.
    #[error("Empty message")]
    Empty,
    /// udev's re-broadcast format, not the kernel's.
    #[error("udev (libudev) message, not a kernel uevent")]
    Libudev,
    /// A field is not UTF-8.
    #[error("Field {index} is not UTF-8")]
    NotUtf8 {
        /// Which NUL-separated field (0 is the header).
        index: usize,
    },
    /// The header is not `ACTION@DEVPATH`.
    #[error("Header {0:?} is not ACTION@DEVPATH")]
    Header(String),
    /// A variable is not `KEY=VALUE`.
    #[error("Variable {0:?} is not KEY=VALUE")]
    Variable(String),
    /// The header and the `ACTION`/`DEVPATH` variables disagree.
    #[error("Header says {header:?}, variable {key} says {value:?}")]
    Inconsistent {
        /// The header's value.
        header: String,
        /// The variable.
        key: &'static str,
        /// The variable's value.
        value: String,
    },
}

/// A parsed kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `remove`, `change`, `move`, `online`, `offline`, `bind`, `unbind`.
    pub action: String,
    /// The device's path under /sys, e.g. `/devices/system/cpu/cpu3`.
    pub devpath: String,
    /// The environment, in the kernel's order.
    pub vars: Vec<(String, String)>,
}

impl Uevent {
    /// The value of variable `key`, if the event has it.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one datagram. Empty fields (the trailing NUL, or doubled NULs) are skipped.
pub fn parse(message: &[u8]) -> Result<Uevent, UeventError> {
    if message.starts_with(b"libudev\0") {
        return Err(UeventError::Libudev);
    }
    let mut fields = message
        .split(|&b| b == 0)
        .enumerate()
        .filter(|(_, field)| !field.is_empty())
        .map(|(index, field)| {
            std::str::from_utf8(field).map_err(|_| UeventError::NotUtf8 { index })
        });
    let header = fields.next().ok_or(UeventError::Empty)??;
    let (action, devpath) = header
        .split_once('@')
        .filter(|(action, devpath)| !action.is_empty() && devpath.starts_with('/'))
        .ok_or_else(|| UeventError::Header(truncated(header)))?;
    let mut vars = Vec::new();
    for field in fields {
        let field = field?;
        let (key, value) = field
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| UeventError::Variable(truncated(field)))?;
        vars.push((key.to_owned(), value.to_owned()));
    }
    let event = Uevent {
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        vars,
    };
    for (key, header) in [("ACTION", action), ("DEVPATH", devpath)] {
        match event.var(key) {
            Some(value) if value != header => {
                return Err(UeventError::Inconsistent {
                    header: truncated(header),
                    key,
                    value: truncated(value),
                })
            }
            _ => {}
        }
    }
    Ok(event)
}

/// Keeps error texts (which end up in logs) short whatever a message contains.
fn truncated(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// What a uevent means for the CPU service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuUevent {
    /// The kernel registered CPU n (register_cpu → device_add): it is offline and wants onlining.
    Add(u32),
    /// The kernel unregistered CPU n (unregister_cpu → device_unregister).
    Remove(u32),
    /// CPU n came online (device_online, or the SMT control).
    Online(u32),
    /// CPU n went offline (device_offline, e.g. before an ACPI eject, or the SMT control).
    Offline(u32),
}

/// Prefix of a CPU device's DEVPATH (drivers/base/cpu.c: bus "cpu", device name "cpu<n>").
const CPU_DEVPATH: &str = "/devices/system/cpu/cpu";

/// The CPU meaning of `event`, or `None` when it is not about a CPU device (other subsystems,
/// `/devices/system/cpu/cpu0/cache/index0`, driver `bind`/`unbind`, `change`).
pub fn cpu_uevent(event: &Uevent) -> Option<CpuUevent> {
    if event.var("SUBSYSTEM") != Some("cpu") {
        return None;
    }
    let number = event.devpath.strip_prefix(CPU_DEVPATH)?;
    // Digits only: u32::from_str would also take "+3".
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let cpu: u32 = number.parse().ok()?;
    match event.action.as_str() {
        "add" => Some(CpuUevent::Add(cpu)),
        "remove" => Some(CpuUevent::Remove(cpu)),
        "online" => Some(CpuUevent::Online(cpu)),
        "offline" => Some(CpuUevent::Offline(cpu)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hot-added CPU's uevent as Linux 6.12 arm64 sends it (captured shape; SEQNUM varies).
    const ADD_CPU3: &[u8] = b"add@/devices/system/cpu/cpu3\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu3\0SUBSYSTEM=cpu\0MODALIAS=cpu:type:aarch64:feature:,0000,0001,0002,0003,0004,0005,0006,0007\0SEQNUM=1234\0";

    fn cpu_message(action: &str, devpath: &str, subsystem: &str) -> Vec<u8> {
        format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0SEQNUM=7\0")
            .into_bytes()
    }

    #[test]
    fn test_parse_kernel_add_message_gives_action_devpath_and_vars() {
        let event = parse(ADD_CPU3).expect("parse");
        assert_eq!(
            (event.action.as_str(), event.devpath.as_str()),
            ("add", "/devices/system/cpu/cpu3")
        );
        assert_eq!(
            (
                event.var("SUBSYSTEM"),
                event.var("SEQNUM"),
                event.var("NOPE")
            ),
            (Some("cpu"), Some("1234"), None)
        );
        assert_eq!(cpu_uevent(&event), Some(CpuUevent::Add(3)));
    }

    #[test]
    fn test_cpu_uevent_maps_the_four_cpu_actions() {
        let devpath = "/devices/system/cpu/cpu127";
        let kinds: Vec<_> = ["add", "remove", "online", "offline"]
            .iter()
            .map(|action| {
                parse(&cpu_message(action, devpath, "cpu"))
                    .ok()
                    .as_ref()
                    .and_then(cpu_uevent)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                Some(CpuUevent::Add(127)),
                Some(CpuUevent::Remove(127)),
                Some(CpuUevent::Online(127)),
                Some(CpuUevent::Offline(127))
            ]
        );
    }

    #[test]
    fn test_cpu_uevent_ignores_bind_cache_other_subsystems_and_odd_names() {
        let ignored = [
            cpu_message("bind", "/devices/system/cpu/cpu3", "cpu"),
            cpu_message("add", "/devices/system/cpu/cpu3/cache/index0", "cpu"),
            cpu_message(
                "add",
                "/devices/LNXSYSTM:00/LNXSYBUS:00/ACPI0007:03",
                "acpi",
            ),
            cpu_message("add", "/devices/system/cpu/cpu3", "memory"),
            cpu_message("add", "/devices/system/cpu/cpufreq", "cpu"),
            cpu_message("add", "/devices/system/cpu/cpu+3", "cpu"),
            cpu_message("add", "/devices/system/cpu/cpu", "cpu"),
            cpu_message("add", "/devices/system/cpu/cpu99999999999", "cpu"),
        ];
        for message in ignored {
            let event = parse(&message).expect("well-formed");
            assert_eq!(cpu_uevent(&event), None, "{event:?}");
        }
    }

    #[test]
    fn test_parse_without_trailing_nul_is_accepted() {
        let event = parse(b"online@/devices/system/cpu/cpu1\0SUBSYSTEM=cpu").expect("parse");
        assert_eq!(cpu_uevent(&event), Some(CpuUevent::Online(1)));
    }

    #[test]
    fn test_parse_truncated_message_keeps_only_whole_fields() {
        // Cut inside a key: the tail "SUBSYS" has no '=' and the message is refused. (A cut inside
        // a value cannot be seen here; the socket reports truncation itself, see netlink.rs.)
        let at = ADD_CPU3
            .windows(10)
            .position(|w| w == b"SUBSYSTEM=")
            .expect("fixture");
        let cut = &ADD_CPU3[..at + 6];
        assert!(
            matches!(parse(cut), Err(UeventError::Variable(_))),
            "{:?}",
            parse(cut)
        );
        // Cut inside the header: no '@'.
        assert!(matches!(parse(&ADD_CPU3[..3]), Err(UeventError::Header(_))));
    }

    #[test]
    fn test_parse_garbage_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"",
            b"\0\0\0",
            b"libudev\0\xfe\xed\xca\xfe",
            b"add@\0",
            b"@/devices/x\0",
            b"add@relative\0",
            b"add@/devices/x\0=value\0",
            b"add@/devices/x\0NOEQUALS\0",
            b"add@/devices/\xff\0",
            b"add@/devices/x\0KEY=\xc3\x28\0",
            b"add@/devices/x\0ACTION=remove\0",
            b"add@/devices/x\0DEVPATH=/devices/y\0",
        ];
        for case in cases {
            assert!(parse(case).is_err(), "{case:?}");
        }
        // Pseudo-random bytes: whatever the outcome, no panic.
        let mut x: u32 = 0x1234_5678;
        for len in 0..512 {
            let noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x & 0xff) as u8
                })
                .collect();
            let _ = parse(&noise).as_ref().map(cpu_uevent);
        }
    }

    #[test]
    fn test_parse_error_texts_are_bounded() {
        let long = format!("{}\0", "x".repeat(10_000));
        match parse(long.as_bytes()) {
            Err(UeventError::Header(text)) => assert!(text.chars().count() <= 81, "{}", text.len()),
            other => panic!("expected Header, got {other:?}"),
        }
    }

    #[test]
    fn test_parse_value_may_contain_equals_and_be_empty() {
        let event = parse(b"change@/devices/x\0A=b=c\0EMPTY=\0").expect("parse");
        assert_eq!(
            (event.var("A"), event.var("EMPTY")),
            (Some("b=c"), Some(""))
        );
    }
}
