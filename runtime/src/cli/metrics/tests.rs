use super::*;

fn status() -> cpb::StatusResponse {
    cpb::StatusResponse {
        name: "pod-a".into(),
        state: "running".into(),
        max_vcpus: 8,
        vcpus_plugged: 2,
        guest_cpus_online_count: 2,
        memory_configured_bytes: 512 << 20,
        memory_max_bytes: 2048 << 20,
        memory_plugged_bytes: 128 << 20,
        memory_total_bytes: 600 << 20,
        memory_available_bytes: 500 << 20,
        uptime_ms: 12_500,
        agent_rtt_us: 1_500,
        pid: 42,
        boot: Some(cpb::BootTimings {
            vm_created_ms: 120,
            kernel_started_ms: 400,
            agent_ready_ms: 900,
            jail_setup_us: 0,
        }),
        resize_histograms: vec![cpb::ResizeHistogram {
            kind: "vcpus".into(),
            direction: "grow".into(),
            outcome: "ok".into(),
            count: 3,
            sum_us: 250_000,
            bucket_counts: vec![0, 0, 0, 1, 2, 3, 3, 3, 3, 3, 3, 3],
        }],
        ..Default::default()
    }
}

fn value(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

#[test]
fn test_a_sandbox_renders_as_prometheus_families_with_units_in_their_names() {
    let samples = [
        Sample {
            name: "pod-a".into(),
            status: Some(status()),
            rss: vec![(
                "vmm",
                Rss {
                    anon: 4096,
                    file: 8192,
                    shmem: 1 << 20,
                },
            )],
        },
        Sample {
            name: "gone".into(),
            ..Default::default()
        },
    ];
    let text = render(&samples);
    assert_eq!(
        value(&text, r#"accordion_sandbox_up{sandbox="pod-a"}"#).as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, r#"accordion_sandbox_up{sandbox="gone"}"#).as_deref(),
        Some("0")
    );
    assert_eq!(
        value(
            &text,
            r#"accordion_vcpus{sandbox="pod-a",state="possible"}"#
        )
        .as_deref(),
        Some("8")
    );
    assert_eq!(
        value(
            &text,
            r#"accordion_memory_bytes{sandbox="pod-a",state="max"}"#
        )
        .as_deref(),
        Some("2147483648")
    );
    assert_eq!(
        value(
            &text,
            r#"accordion_boot_phase_seconds{sandbox="pod-a",phase="agent_ready"}"#
        )
        .as_deref(),
        Some("0.9")
    );
    assert_eq!(
        value(&text, r#"accordion_agent_rtt_seconds{sandbox="pod-a"}"#).as_deref(),
        Some("0.0015")
    );
    let h = r#"sandbox="pod-a",kind="vcpus",direction="grow",outcome="ok""#;
    assert_eq!(
        value(
            &text,
            &format!("accordion_resize_duration_seconds_bucket{{{h},le=\"0.05\"}}")
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &text,
            &format!("accordion_resize_duration_seconds_bucket{{{h},le=\"+Inf\"}}")
        )
        .as_deref(),
        Some("3")
    );
    assert_eq!(
        value(
            &text,
            &format!("accordion_resize_duration_seconds_sum{{{h}}}")
        )
        .as_deref(),
        Some("0.25")
    );
    assert_eq!(
        value(
            &text,
            r#"accordion_process_resident_memory_bytes{sandbox="pod-a",process="vmm",kind="shmem"}"#
        )
        .as_deref(),
        Some("1048576")
    );
    // A sandbox that did not answer has nothing but its up line.
    assert_eq!(text.matches(r#"sandbox="gone""#).count(), 1);
}

#[test]
fn test_every_family_has_one_help_and_type_and_its_samples_follow_it() {
    let text = render(&[Sample {
        name: "pod-a".into(),
        status: Some(status()),
        rss: Vec::new(),
    }]);
    let mut seen = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(!seen.contains(&name), "{name} twice");
            seen.push(name.clone());
            current = name;
        } else if !line.starts_with('#') {
            assert!(line.starts_with(&current), "{line} outside {current}");
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
    assert!(seen.iter().all(|n| n.starts_with("accordion_")));
}

#[test]
fn test_label_values_are_escaped() {
    assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

#[test]
fn test_rss_and_stat_parsing_and_descendants() {
    let status =
        "Name:\tx\nVmRSS:\t  300 kB\nRssAnon:\t  100 kB\nRssFile:\t  150 kB\nRssShmem:\t  50 kB\n";
    assert_eq!(
        parse_rss(status),
        Rss {
            anon: 100 * 1024,
            file: 150 * 1024,
            shmem: 50 * 1024
        }
    );
    assert_eq!(
        parse_stat("12 (virtio fs) (x) S 7 12 12 0"),
        Some(("virtio fs) (x".to_string(), 7))
    );
    let table: HashMap<u32, (String, u32)> = [
        (10, ("shim".into(), 1)),
        (11, ("virtiofsd".into(), 10)),
        (12, ("virtiofsd".into(), 11)),
        (20, ("virtiofsd".into(), 1)),
    ]
    .into_iter()
    .collect();
    assert_eq!(descendants_named(&table, 10, "virtiofsd"), [11, 12]);
}
