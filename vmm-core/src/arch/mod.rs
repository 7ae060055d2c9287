//! Architecture-specific code. ARM64 is the only backend. Its guest-description modules (layout,
//! Image header, FDT, EFI tables) are plain data and build everywhere so they are unit-tested on
//! any host; everything that talks to KVM is compiled only for aarch64.

pub mod aarch64;
