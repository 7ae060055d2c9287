//! `accordion status NAME`.

use accordion_proto::control::v1 as cpb;
use clap::Args;

use crate::confinement::{describe_caps, describe_seccomp};
use crate::control::client::ControlClient;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The sandbox.
    pub name: String,
}

pub async fn run(args: StatusArgs) -> i32 {
    let status = match ControlClient::connect_to(&args.name).await {
        Ok(client) => client.status().await,
        Err(e) => Err(e),
    };
    match status {
        Ok(status) => {
            print!("{}", render(&status));
            0
        }
        Err(e) => {
            eprintln!("accordion status: {}", super::error_chain(&e));
            1
        }
    }
}

const MIB: u64 = 1 << 20;

/// One `key: value` line per fact, stable for scripts.
fn render(s: &cpb::StatusResponse) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k}: {v}\n"));
    line("name", s.name.clone());
    line("state", s.state.clone());
    line("pid", s.pid.to_string());
    if !s.exit_reason.is_empty() {
        line("exit reason", s.exit_reason.clone());
    }
    if !s.agent_error.is_empty() {
        line("agent error", s.agent_error.clone());
    }
    line(
        "vcpus",
        format!(
            "{} online in the guest, {} plugged, {} running, {} possible",
            s.guest_cpus_online_count, s.vcpus_plugged, s.vcpus_online, s.max_vcpus
        ),
    );
    line("guest cpus online", s.guest_cpus_online.clone());
    line("vcpus plugged", s.vcpus_plugged_list.clone());
    line(
        "memory",
        format!(
            "{} MiB configured, {} MiB in the guest, {} MiB available",
            s.memory_configured_bytes / MIB,
            s.memory_total_bytes / MIB,
            s.memory_available_bytes / MIB
        ),
    );
    if s.memory_max_bytes > s.memory_configured_bytes {
        line(
            "memory plugged",
            format!(
                "{} MiB plugged of {} MiB asked, up to {} MiB",
                s.memory_plugged_bytes / MIB,
                s.memory_requested_bytes / MIB,
                s.memory_max_bytes / MIB
            ),
        );
    }
    line("uptime", format!("{:.1} s", s.uptime_ms as f64 / 1e3));
    line("agent version", s.agent_version.clone());
    line("kernel", s.kernel_release.clone());
    if let Some(b) = &s.boot {
        let init = match b.kernel_started_ms {
            0 => "n/a".to_string(),
            ms => format!("{ms} ms"),
        };
        let jail = match b.jail_setup_us {
            0 => String::new(),
            us => format!(" (jail {:.1} ms)", us as f64 / 1e3),
        };
        line(
            "boot",
            format!(
                "VM created {} ms{jail}, guest init {init}, agent ready {} ms",
                b.vm_created_ms, b.agent_ready_ms
            ),
        );
    }
    if let Some(c) = &s.confinement {
        render_confinement(c, &mut line);
    }
    for r in &s.recent_resizes {
        line(
            "resize",
            format!(
                "to {} {} in {:.1} ms: {}",
                r.target,
                if r.ok { "ok" } else { "FAILED" },
                r.latency_us as f64 / 1e3,
                r.result
            ),
        );
    }
    for r in &s.recent_memory_resizes {
        line(
            "memory resize",
            format!(
                "to {} MiB {} in {:.1} ms: {}",
                r.target,
                if r.ok { "ok" } else { "FAILED" },
                r.latency_us as f64 / 1e3,
                r.result
            ),
        );
    }
    out
}

/// The VMM process's confinement: what a guest that escaped the VMM would hold.
fn render_confinement(c: &cpb::Confinement, line: &mut impl FnMut(&str, String)) {
    if !c.error.is_empty() {
        line("confinement", format!("unknown: {}", c.error));
        return;
    }
    let list = |v: &[String]| match v {
        [] => "none".to_string(),
        v => v.join(" "),
    };
    line("vmm process", c.pid.to_string());
    line(
        "vmm ids",
        format!(
            "uid {} (effective {}), gid {} (effective {})",
            c.uid, c.euid, c.gid, c.egid
        ),
    );
    line("vmm capabilities", describe_caps(c.cap_eff));
    line("vmm no_new_privs", u8::from(c.no_new_privs).to_string());
    line(
        "vmm seccomp",
        describe_seccomp(c.seccomp_threads, c.threads),
    );
    let mut namespaces = format!(
        "host: {}; own: {}",
        list(&c.host_namespaces),
        list(&c.own_namespaces)
    );
    if !c.unknown_namespaces.is_empty() {
        namespaces += &format!("; unknown: {}", list(&c.unknown_namespaces));
    }
    line("vmm namespaces", namespaces);
    line("vmm cgroup", c.cgroup.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render_shows_cpus_agent_and_boot() {
        let mut s = cpb::StatusResponse {
            name: "b1".into(),
            state: "running".into(),
            vcpus_plugged: 1,
            vcpus_online: 1,
            max_vcpus: 8,
            guest_cpus_online: "0".into(),
            guest_cpus_online_count: 1,
            agent_version: "0.1.0".into(),
            boot: Some(cpb::BootTimings {
                vm_created_ms: 5,
                kernel_started_ms: 0,
                agent_ready_ms: 900,
                jail_setup_us: 0,
            }),
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("vcpus: 1 online in the guest, 1 plugged, 1 running, 8 possible\n"));
        assert!(text.contains("agent version: 0.1.0\n"));
        assert!(text.contains("boot: VM created 5 ms, guest init n/a, agent ready 900 ms\n"));
        if let Some(boot) = &mut s.boot {
            boot.jail_setup_us = 12_345;
        }
        assert!(render(&s).contains("boot: VM created 5 ms (jail 12.3 ms), guest init n/a,"));
        assert!(!text.contains("exit reason"));
        assert!(!text.contains("vmm "));
    }

    #[test]
    fn test_render_shows_the_vmm_confinement_or_why_not() {
        let mut s = cpb::StatusResponse {
            confinement: Some(cpb::Confinement {
                uid: 0,
                euid: 0,
                cap_eff: 0x1ff_ffff_ffff,
                seccomp_threads: 0,
                threads: 12,
                host_namespaces: vec!["mnt".into(), "net".into()],
                cgroup: "/kubepods/pod1/abc".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("vmm ids: uid 0 (effective 0), gid 0 (effective 0)\n"));
        assert!(text.contains("vmm capabilities: all (000001ffffffffff)\n"));
        assert!(text.contains("vmm no_new_privs: 0\n"));
        assert!(text.contains("vmm seccomp: off\n"));
        assert!(text.contains("vmm namespaces: host: mnt net; own: none\n"));
        if let Some(c) = s.confinement.as_mut() {
            c.unknown_namespaces = vec!["user".into()];
        }
        assert!(render(&s).contains("vmm namespaces: host: mnt net; own: none; unknown: user\n"));
        assert!(text.contains("vmm cgroup: /kubepods/pod1/abc\n"));
        s.confinement = Some(cpb::Confinement {
            error: "reading /proc/7: gone".into(),
            ..Default::default()
        });
        let text = render(&s);
        assert!(text.contains("confinement: unknown: reading /proc/7: gone\n"));
        assert!(!text.contains("vmm seccomp"));
    }
}
