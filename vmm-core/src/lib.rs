//! accordion-vmm: Accordion's embedded ARM64 KVM microVM core.

pub mod platform;
