//! The DSDT's CPU part: one ACPI0007 processor device per possible vCPU whose `_STA` and `_EJ0`
//! go through the CPU hotplug controller (devices/cpu_hotplug.rs), and the methods around that
//! register block: `CSTS` (status), `CEJ0` (eject), `CSCN` (the scan the GED's `_EVT` runs) and
//! `CNTF` (Notify by index; Notify needs a name, not a number).
//!
//! Linux 6.11+ on arm64 (drivers/acpi/acpi_processor.c, Documentation/arch/arm64/cpu-hotplug.rst)
//! keeps every possible CPU *present* and toggles only *enabled*: `_STA` is 0x0F for a plugged
//! vCPU and 0x01 (present, not enabled) for the others. A Device Check (Notify 0x01) makes the
//! kernel re-read `_STA` and register a newly enabled CPU; an Eject Request (Notify 0x03) makes it
//! offline the CPU (PSCI CPU_OFF), unregister it and run `_EJ0`, then check `_STA` says disabled.
//!
//! All register accesses hold the `CPLK` mutex: SELECT then FLAGS is a two-step protocol.

use acpi_tables::aml::{
    Acquire, Add, And, Arg, Device, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, GreaterEqual, If, LessThan, Local, Method, MethodCall, Mutex, Name, Notify,
    OpRegion, OpRegionSpace, Path, Release, Return, Store, While,
};
use acpi_tables::{Aml, AmlSink};

use crate::devices::cpu_hotplug::{
    FLAG_EJECT, FLAG_ENABLED, FLAG_INSERTING, FLAG_REMOVING, REGISTER_BLOCK_SIZE,
};

/// `_STA`: present, enabled, shown in UI, functioning.
pub const STA_PLUGGED: u8 = 0x0f;
/// `_STA`: present but not enabled; Linux keeps the CPU possible (and present) but not usable.
pub const STA_NOT_PLUGGED: u8 = 0x01;
/// Notify value: Device Check (re-read `_STA`, add the device if it appeared).
pub const NOTIFY_DEVICE_CHECK: u8 = 0x01;
/// Notify value: Eject Request (offline, remove, `_EJ0`).
pub const NOTIFY_EJECT_REQUEST: u8 = 0x03;
/// Acquire timeout meaning "wait forever".
const WAIT_FOREVER: u16 = 0xffff;

const MUTEX: &str = "\\_SB_.CPLK";
const SELECT: &str = "\\_SB_.CSEL";
const FLAGS: &str = "\\_SB_.CFLG";
const NEXT: &str = "\\_SB_.CNXT";
const STATUS_METHOD: &str = "\\_SB_.CSTS";
const EJECT_METHOD: &str = "\\_SB_.CEJ0";
const NOTIFY_METHOD: &str = "\\_SB_.CNTF";
/// The scan method the GED's `_EVT` calls.
pub const SCAN_METHOD: &str = "\\_SB_.CSCN";

/// An ACPI0007 processor device. `_UID` equals the GICC's ACPI processor UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessorDevice {
    /// ACPI processor UID (= vCPU index).
    pub uid: u32,
}

impl ProcessorDevice {
    /// The device's 4-character name, `C000`..`CFFF`.
    pub fn name(&self) -> String {
        format!("C{:03X}", self.uid & 0xfff)
    }
}

impl Aml for ProcessorDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let status = MethodCall::new(STATUS_METHOD.into(), vec![&self.uid]);
        let ret = Return::new(&status);
        let sta = Method::new("_STA".into(), 0, false, vec![&ret]);
        let eject_call = MethodCall::new(EJECT_METHOD.into(), vec![&self.uid]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&eject_call]);
        let hid = Name::new("_HID".into(), &"ACPI0007");
        let uid = Name::new("_UID".into(), &self.uid);
        let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &sta];
        // vCPU 0 is never unplugged; without `_EJ0` Linux does not offer to eject it either.
        if self.uid != 0 {
            children.push(&ej0);
        }
        Device::new(Path::new(&self.name()), children).to_aml_bytes(sink);
    }
}

/// The controller's register block and the methods around it, for `count` possible vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuHotplugMethods {
    /// MMIO base of the controller.
    pub base: u32,
    /// Possible vCPUs.
    pub count: u32,
}

impl Aml for CpuHotplugMethods {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        OpRegion::new(
            "CPRG".into(),
            OpRegionSpace::SystemMemory,
            &self.base,
            &REGISTER_BLOCK_SIZE,
        )
        .to_aml_bytes(sink);
        Field::new(
            "CPRG".into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            vec![
                FieldEntry::Named(*b"CSEL", 32),
                FieldEntry::Named(*b"CFLG", 32),
                FieldEntry::Named(*b"CNXT", 32),
                FieldEntry::Named(*b"CCNT", 32),
            ],
        )
        .to_aml_bytes(sink);
        Mutex::new("CPLK".into(), 0).to_aml_bytes(sink);
        status_method().to_aml_bytes(sink);
        eject_method().to_aml_bytes(sink);
        notify_method(self.count, sink);
        scan_method(self.count, sink);
    }
}

/// `CSTS(uid)`: 0x0F if the controller says enabled, else 0x01.
fn status_method() -> impl Aml {
    struct Csts;
    impl Aml for Csts {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            let (select_reg, flags_reg) = (Path::new(SELECT), Path::new(FLAGS));
            let acquire = Acquire::new(MUTEX.into(), WAIT_FOREVER);
            let select = Store::new(&select_reg, &Arg(0));
            let read = Store::new(&Local(0), &flags_reg);
            let release = Release::new(MUTEX.into());
            let enabled = And::new(&Local(1), &Local(0), &FLAG_ENABLED);
            let is_enabled = Equal::new(&enabled, &FLAG_ENABLED);
            let ret_plugged = Return::new(&STA_PLUGGED);
            let if_enabled = If::new(&is_enabled, vec![&ret_plugged]);
            let ret_not = Return::new(&STA_NOT_PLUGGED);
            Method::new(
                STATUS_METHOD.into(),
                1,
                false,
                vec![&acquire, &select, &read, &release, &if_enabled, &ret_not],
            )
            .to_aml_bytes(sink);
        }
    }
    Csts
}

/// `CEJ0(uid)`: the eject command; the VMM has unplugged the vCPU when the write returns.
fn eject_method() -> impl Aml {
    struct Cej0;
    impl Aml for Cej0 {
        fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
            let (select_reg, flags_reg) = (Path::new(SELECT), Path::new(FLAGS));
            let acquire = Acquire::new(MUTEX.into(), WAIT_FOREVER);
            let select = Store::new(&select_reg, &Arg(0));
            let eject = Store::new(&flags_reg, &FLAG_EJECT);
            let release = Release::new(MUTEX.into());
            Method::new(
                EJECT_METHOD.into(),
                1,
                false,
                vec![&acquire, &select, &eject, &release],
            )
            .to_aml_bytes(sink);
        }
    }
    Cej0
}

/// `CNTF(index, value)`: `Notify(Cxxx, value)` for the processor device of `index`.
fn notify_method(count: u32, sink: &mut dyn AmlSink) {
    let (index, value) = (Arg(0), Arg(1));
    let uids: Vec<u32> = (0..count).collect();
    let devices: Vec<Path> = uids
        .iter()
        .map(|&uid| Path::new(&ProcessorDevice { uid }.name()))
        .collect();
    let notifies: Vec<Notify> = devices.iter().map(|d| Notify::new(d, &value)).collect();
    let conditions: Vec<Equal> = uids.iter().map(|uid| Equal::new(&index, uid)).collect();
    let branches: Vec<If> = conditions
        .iter()
        .zip(&notifies)
        .map(|(c, n)| If::new(c, vec![n]))
        .collect();
    let body: Vec<&dyn Aml> = branches.iter().map(|b| b as &dyn Aml).collect();
    Method::new(NOTIFY_METHOD.into(), 2, false, body).to_aml_bytes(sink);
}

/// `CSCN()`: while the controller reports a vCPU with an event (NEXT), Notify it (Device Check
/// for inserting, Eject Request for removing) and acknowledge the flag. Each pass clears one
/// event, so `count` vCPUs need at most `count` passes; the bound (4 x count) only stops a
/// misbehaving register block from hanging the guest's GED thread.
fn scan_method(count: u32, sink: &mut dyn AmlSink) {
    let (cpu, flags, bit, passes) = (Local(0), Local(1), Local(2), Local(3));
    let limit = count.saturating_mul(4);
    let (select_reg, flags_reg, next_reg) = (Path::new(SELECT), Path::new(FLAGS), Path::new(NEXT));
    let acquire = Acquire::new(MUTEX.into(), WAIT_FOREVER);
    let release = Release::new(MUTEX.into());
    let read_next = Store::new(&cpu, &next_reg);
    let zero_passes = Store::new(&passes, &0u8);

    let select = Store::new(&select_reg, &cpu);
    let read_flags = Store::new(&flags, &flags_reg);
    let inserting = And::new(&bit, &flags, &FLAG_INSERTING);
    let is_inserting = Equal::new(&inserting, &FLAG_INSERTING);
    let notify_check = MethodCall::new(NOTIFY_METHOD.into(), vec![&cpu, &NOTIFY_DEVICE_CHECK]);
    let ack_insert = Store::new(&flags_reg, &FLAG_INSERTING);
    let on_insert = If::new(&is_inserting, vec![&notify_check, &ack_insert]);
    let removing = And::new(&bit, &flags, &FLAG_REMOVING);
    let is_removing = Equal::new(&removing, &FLAG_REMOVING);
    let notify_eject = MethodCall::new(NOTIFY_METHOD.into(), vec![&cpu, &NOTIFY_EJECT_REQUEST]);
    let ack_remove = Store::new(&flags_reg, &FLAG_REMOVING);
    let on_remove = If::new(&is_removing, vec![&notify_eject, &ack_remove]);
    let count_pass = Add::new(&passes, &passes, &1u8);
    let too_many = GreaterEqual::new(&passes, &limit);
    let give_up = Store::new(&cpu, &count);
    let stop = If::new(&too_many, vec![&give_up]);
    let more = LessThan::new(&cpu, &count);
    let scan = While::new(
        &more,
        vec![
            &select,
            &read_flags,
            &on_insert,
            &on_remove,
            &read_next,
            &count_pass,
            &stop,
        ],
    );
    Method::new(
        SCAN_METHOD.into(),
        0,
        false,
        vec![&acquire, &read_next, &zero_passes, &scan, &release],
    )
    .to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(aml: &dyn Aml) -> Vec<u8> {
        let mut v = Vec::new();
        aml.to_aml_bytes(&mut v);
        v
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn test_processor_sta_calls_csts_with_its_uid_and_ej0_calls_cej0() {
        let aml = bytes(&ProcessorDevice { uid: 5 });
        // Method(_STA, 0) { Return (\_SB.CSTS(5)) }: ReturnOp, root, DualNamePrefix, _SB_ CSTS, 5.
        assert!(contains(&aml, b"\xa4\\\x2e_SB_CSTS\x0a\x05"));
        // _EJ0 with one argument calls \_SB.CEJ0(5).
        assert!(contains(&aml, b"_EJ0\x01\\\x2e_SB_CEJ0\x0a\x05"));
        assert!(contains(&aml, b"_HID\x0dACPI0007\x00"));
    }

    #[test]
    fn test_vcpu0_has_no_ej0() {
        assert!(!contains(&bytes(&ProcessorDevice { uid: 0 }), b"_EJ0"));
    }

    #[test]
    fn test_register_block_fields_are_four_dwords_at_the_controller_base() {
        let aml = bytes(&CpuHotplugMethods {
            base: 0x0d00_3000,
            count: 8,
        });
        // OperationRegion(CPRG, SystemMemory, 0x0D003000, 0x10).
        assert!(contains(
            &aml,
            b"\x5b\x80CPRG\x00\x0c\x00\x30\x00\x0d\x0a\x10"
        ));
        // Field(CPRG, DWordAcc, NoLock, WriteAsZeros) { CSEL 32, CFLG 32, CNXT 32, CCNT 32 }.
        assert!(contains(&aml, b"CPRG\x43CSEL\x20CFLG\x20CNXT\x20CCNT\x20"));
        // Mutex(CPLK, 0).
        assert!(contains(&aml, b"\x5b\x01CPLK\x00"));
    }

    #[test]
    fn test_notify_method_has_one_branch_per_vcpu() {
        let aml = bytes(&CpuHotplugMethods {
            base: 0x0d00_3000,
            count: 8,
        });
        for uid in 0..8u8 {
            // If (Arg0 == uid) { Notify (C00x, Arg1) }.
            let name = format!("C00{uid:X}");
            let mut branch = vec![0x93, 0x68];
            branch.extend(bytes(&uid));
            branch.push(0x86);
            branch.extend(name.as_bytes());
            branch.push(0x69);
            assert!(contains(&aml, &branch), "{name}");
        }
        assert!(!contains(&aml, b"C008"));
    }

    #[test]
    fn test_scan_notifies_device_check_and_eject_request_and_acks_each() {
        let aml = bytes(&CpuHotplugMethods {
            base: 0x0d00_3000,
            count: 8,
        });
        // CNTF(Local0, 1) then CFLG = 2; CNTF(Local0, 3) then CFLG = 4.
        assert!(contains(
            &aml,
            b"_SB_CNTF\x60\x01\x70\x0a\x02\\\x2e_SB_CFLG"
        ));
        assert!(contains(
            &aml,
            b"_SB_CNTF\x60\x0a\x03\x70\x0a\x04\\\x2e_SB_CFLG"
        ));
        // The scan runs under the mutex: Acquire(CPLK, 0xFFFF) ... Release(CPLK).
        assert!(contains(&aml, b"\x5b\x23\\\x2e_SB_CPLK\xff\xff"));
        assert!(contains(&aml, b"\x5b\x27\\\x2e_SB_CPLK"));
    }
}
