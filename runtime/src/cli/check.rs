//! `accordion check`: what this host's KVM offers, what is missing, and how long probing took.

use accordion_vmm::platform;

pub fn run() -> i32 {
    let report = match platform::probe() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("accordion check: {e}");
            return 1;
        }
    };
    let yes_no = |b: bool| if b { "yes" } else { "NO" };
    println!("KVM API version        {}", report.api_version);
    println!("PSCI 0.2               {}", yes_no(report.psci_0_2));
    println!("vCPUs (recommended)    {}", report.nr_vcpus);
    println!("vCPUs (max per VM)     {}", report.max_vcpus);
    println!(
        "IPA bits               {}",
        if report.ipa_bits == 0 {
            "40 (fixed)".to_string()
        } else {
            report.ipa_bits.to_string()
        }
    );
    println!("in-kernel GICv3        {}", yes_no(report.vgic_v3));
    println!("SMCCC filter (PSCI)    {}", yes_no(report.smccc_filter));
    for (step, took) in &report.timings {
        println!("time: {step:<28} {:>8.3} ms", took.as_secs_f64() * 1e3);
    }
    let missing = report.missing();
    if missing.is_empty() {
        println!("OK: this host can run Accordion with vCPU hotplug");
        0
    } else {
        println!("NOT SUITABLE: missing {}", missing.join(", "));
        1
    }
}
