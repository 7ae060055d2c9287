//! `accordion acpi-dump DIR --vcpus N --max-vcpus M`: writes the ACPI tables a VM of that shape
//! gets, one `<signature>.dat` per table, for `iasl -d` and `acpiexec`. Needs no KVM.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct AcpiDumpArgs {
    /// Directory to write the tables into (created if missing).
    pub dir: PathBuf,
    /// vCPUs plugged at boot (MADT GICC Enabled, _STA 0xF).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Possible vCPUs (the rest: GICC Online Capable, _STA 0x1 until plugged).
    #[arg(long, default_value_t = 64)]
    pub max_vcpus: u32,
}

pub fn run(args: &AcpiDumpArgs) -> i32 {
    if args.vcpus == 0 || args.vcpus > args.max_vcpus {
        eprintln!(
            "accordion acpi-dump: --vcpus must be between 1 and --max-vcpus ({})",
            args.max_vcpus
        );
        return 2;
    }
    let tables = match accordion_vmm::vm::acpi_tables(args.vcpus, args.max_vcpus) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("accordion acpi-dump: {}", super::error_chain(&e));
            return 1;
        }
    };
    if let Err(e) = tables.dump(&args.dir) {
        eprintln!(
            "accordion acpi-dump: cannot write {}: {e}",
            args.dir.display()
        );
        return 1;
    }
    println!(
        "ACPI tables for {} of {} vCPUs written to {}",
        args.vcpus,
        args.max_vcpus,
        args.dir.display()
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_acpi_dump_writes_madt_and_dsdt() {
        let dir = std::env::temp_dir().join(format!("acpi-dump-{}", std::process::id()));
        let args = AcpiDumpArgs {
            dir: dir.clone(),
            vcpus: 2,
            max_vcpus: 8,
        };
        assert_eq!(run(&args), 0);
        for sig in ["apic", "dsdt", "facp", "gtdt", "spcr"] {
            let f = dir.join(format!("{sig}.dat"));
            assert!(
                f.metadata().map(|m| m.len() > 36).unwrap_or(false),
                "{} missing",
                f.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_acpi_dump_rejects_more_boot_vcpus_than_possible() {
        let args = AcpiDumpArgs {
            dir: std::env::temp_dir().join("never"),
            vcpus: 9,
            max_vcpus: 8,
        };
        assert_eq!(run(&args), 2);
    }
}
